"""Stage-1 embeddings as the reference's `Blip2Qformer.extract_features` gives them, their files, and a search
over them with the similarity ITC trains.

The five kinds (the reference's names; Q query tokens, H the Q-Former width, D the ITC projection width):

    image_embeds       [B, Q, H]  the query outputs of a query-only pass over the image
    image_embeds_proj  [B, Q, D]  normalize(vision_projection(image_embeds))
    text_embeds        [B, L, H]  the text-only pass (bidirectional, no image); row 0 is [CLS]
    text_embeds_proj   [B, L, D]  normalize(text_projection(text_embeds)); [:, 0] is ITC's text feature
    multimodal_embeds  [B, Q, H]  the query rows of a bidirectional [queries; text] pass over the image
                                  (image-grounded text: what the ITM head reads)

The text kinds come with `text_mask` [B, L] (1 on tokens, 0 on padding). Texts are cleaned and cut to
`max_txt_len` tokens as retrieval evaluation reads them (`Blip2Scorer.score` too).

`blip2-embed` writes them in parts, `part-NNNNNN.<kind>.npy` (or one `part-NNNNNN.safetensors`) beside
`part-NNNNNN.json` (the part's ids, in row order, and what it skipped); `load_embeddings` reads a folder of them
back and `search` ranks its images for a text the way ITC scores a pair: max over the Q queries of
image_embeds_proj . text_embeds_proj[:, 0].
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from blip2_train.data.captions import clean_caption
from blip2_train.utils.errors import ConfigError, DataError
from blip2_train.utils.io import write_json_atomic

IMAGE_KINDS = ("image_embeds", "image_embeds_proj")
TEXT_KINDS = ("text_embeds", "text_embeds_proj")
MULTIMODAL_KINDS = ("multimodal_embeds",)
KINDS = IMAGE_KINDS + TEXT_KINDS + MULTIMODAL_KINDS
MAX_TXT_LEN = 35  # retrieval evaluation's (conf/eval_protocol), the reference's coco retrieval max_len


def check_kinds(kinds, images: bool, texts: bool) -> tuple[str, ...]:
    """The kinds asked for (None: every kind the inputs give), each known and given what it needs, in KINDS
    order; ConfigError naming the first that is not."""
    if kinds is None:
        kinds = (IMAGE_KINDS if images else ()) + (TEXT_KINDS if texts else ()) + \
            (MULTIMODAL_KINDS if images and texts else ())
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for k in kinds:
        if k not in KINDS:
            raise ConfigError(f"unknown kind {k!r}: the kinds are {', '.join(KINDS)}")
        if k in IMAGE_KINDS and not images or k in TEXT_KINDS and not texts or \
                k in MULTIMODAL_KINDS and not (images and texts):
            need = {"image_embeds": "images", "image_embeds_proj": "images", "text_embeds": "texts",
                    "text_embeds_proj": "texts"}.get(k, "images and texts (one per image)")
            raise ConfigError(f"kind {k!r} needs {need}")
    if not kinds:
        raise ConfigError("nothing to embed: give images, texts or both")
    return tuple(k for k in KINDS if k in kinds)


def tokenize(tokenizer, texts: list[str], max_txt_len: int = MAX_TXT_LEN, fixed: bool = False):
    """-> (input_ids, attention_mask) [B, L]: cleaned as retrieval cleans captions, cut at `max_txt_len`; padded
    to the longest (`fixed`: to `max_txt_len`, so that files written batch by batch share one shape)."""
    tok = tokenizer([clean_caption(t, 50) for t in texts], padding="max_length" if fixed else "longest",
                    truncation=True, max_length=max_txt_len, return_tensors="pt")
    return tok["input_ids"], tok["attention_mask"]


@torch.no_grad()
def extract_features(model, kinds, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                     attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A `Blip2Stage1` -> {kind: fp32 tensor} (+ `text_mask`), as the reference's extract_features: the frozen
    image encoder in its own dtype, ln_vision and the Q-Former in fp32. With both images and texts, row i of
    every kind belongs to the pair (pixel_values[i], input_ids[i])."""
    out: dict[str, torch.Tensor] = {}
    image = None
    if pixel_values is not None and any(k in kinds for k in IMAGE_KINDS + MULTIMODAL_KINDS):
        image = model.encode_image(pixel_values)
    if any(k in kinds for k in IMAGE_KINDS):
        query = model.image_query_forward(image)
        out["image_embeds"] = query
        out["image_embeds_proj"] = F.normalize(model.hf.vision_projection(query), dim=-1)
    if any(k in kinds for k in TEXT_KINDS):
        text = model.text_forward(input_ids, attention_mask)
        out["text_embeds"] = text
        out["text_embeds_proj"] = F.normalize(model.hf.text_projection(text), dim=-1)
        out["text_mask"] = attention_mask
    if "multimodal_embeds" in kinds:
        out["multimodal_embeds"] = multimodal_forward(model, image, input_ids, attention_mask)
    return {k: v for k, v in out.items() if k in kinds or k == "text_mask"}


def multimodal_forward(model, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
    """The query rows [B, Q, H] of ITM's pass: [queries; text], every token seeing every other, queries
    cross-attending the image."""
    q = model.query_tokens(image_embeds.shape[0])
    emb = model.hf.embeddings(input_ids=input_ids, query_embeds=q)
    mask = torch.cat([torch.ones(q.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device),
                      attention_mask], dim=1)
    hidden = model.qformer(query_embeds=emb, query_length=q.shape[1], attention_mask=mask,
                           encoder_hidden_states=image_embeds).last_hidden_state
    return hidden[:, : q.shape[1]]


def to_numpy(features: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """fp32 embeddings, the mask as int8."""
    return {k: v.detach().to("cpu", torch.int8 if k == "text_mask" else torch.float32).numpy()
            for k, v in features.items()}


def feature_shapes(model, kinds, text_len: int) -> dict[str, tuple[int, ...]]:
    """Each array's shape after its batch dimension (text_mask with the text kinds)."""
    q, h = model.num_query_tokens, model.config.qformer_config.hidden_size
    d = model.hf.vision_projection.out_features
    shapes = {"image_embeds": (q, h), "image_embeds_proj": (q, d), "text_embeds": (text_len, h),
              "text_embeds_proj": (text_len, d), "multimodal_embeds": (q, h)}
    out = {k: shapes[k] for k in kinds}
    if any(k in kinds for k in TEXT_KINDS):
        out["text_mask"] = (text_len,)
    return out


def embed_all(model, tokenizer, kinds, pixels: torch.Tensor | None = None, texts: list[str] | None = None,
              max_txt_len: int = MAX_TXT_LEN, batch_size: int = 32, fixed: bool = False) -> dict[str, np.ndarray]:
    """Images [N, 3, H, W] and / or texts (N, paired with the images when both) -> {kind: array [N, ...]}, in
    batches of `batch_size` on the model's device. Texts are tokenized together (one padded length for all, or
    `max_txt_len` when `fixed`), so each text's rows do not depend on the batch it fell in."""
    device = next(model.parameters()).device
    n = len(pixels) if pixels is not None else len(texts or [])
    ids = mask = None
    if texts is not None and any(k in kinds for k in TEXT_KINDS + MULTIMODAL_KINDS) and n:
        ids, mask = tokenize(tokenizer, texts, max_txt_len, fixed)
    chunks: dict[str, list[np.ndarray]] = {}
    for s in range(0, n, batch_size):
        part = slice(s, s + batch_size)
        feats = extract_features(model, kinds, None if pixels is None else pixels[part].to(device),
                                 None if ids is None else ids[part].to(device),
                                 None if mask is None else mask[part].to(device))
        for k, v in to_numpy(feats).items():
            chunks.setdefault(k, []).append(v)
    if not n:
        shapes = feature_shapes(model, kinds, max_txt_len if fixed else 0)
        return {k: np.zeros((0, *s), np.int8 if k == "text_mask" else np.float32) for k, s in shapes.items()}
    return {k: np.concatenate(v) for k, v in chunks.items()}


# -- the files blip2-embed writes ---------------------------------------------------------------------------

FORMATS = ("npy", "safetensors")


def part_name(index: int) -> str:
    return f"part-{index:06d}"


def array_files(out: Path, index: int, names, fmt: str) -> list[Path]:
    if fmt == "safetensors":
        return [out / f"{part_name(index)}.safetensors"]
    return [out / f"{part_name(index)}.{k}.npy" for k in names]


def write_part(out: Path, index: int, arrays: dict[str, np.ndarray], record: dict, fmt: str) -> None:
    """A part's arrays, each through a temporary file and a rename, then its record (`part-NNNNNN.json`, the
    ids): the record is written last, so a part with a record is whole and a run killed before it redoes it."""
    out = Path(out)
    if fmt == "safetensors":
        from safetensors.numpy import save_file

        path = array_files(out, index, arrays, fmt)[0]
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        os.replace(tmp, path)
    else:
        for name, path in zip(arrays, array_files(out, index, arrays, fmt)):
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to the temporary name
                np.save(f, arrays[name])
            os.replace(tmp, path)
    write_json_atomic(out / f"{part_name(index)}.json", record, sort_keys=False)


def read_part_record(out: Path, index: int, names, fmt: str) -> dict | None:
    """The record of a finished part, or None when the part is to be (re)done: no record, one cut short, or an
    array file missing."""
    try:
        rec = json.loads((Path(out) / f"{part_name(index)}.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or not all(p.exists() for p in array_files(Path(out), index, names, fmt)):
        return None
    return rec


def load_embeddings(folder: str | Path, kinds=None) -> dict:
    """A `blip2-embed` output folder -> {"ids": [...], kind: array [N, ...]} over every part, in part order (the
    order of the inputs, skipped items left out)."""
    folder = Path(folder)
    man = folder / "manifest.json"
    if not man.exists():
        raise DataError(f"{folder}: no manifest.json (not a finished blip2-embed output; run it again to finish)")
    manifest = json.loads(man.read_text())
    names = [k for k in manifest["arrays"] if kinds is None or k in kinds or k == "text_mask"]
    ids, parts = [], {k: [] for k in names}
    for p in manifest["parts"]:
        i = int(p["index"])
        ids += json.loads((folder / f"{part_name(i)}.json").read_text())["ids"]
        if manifest["format"] == "safetensors":
            from safetensors.numpy import load_file

            arrays = load_file(str(array_files(folder, i, names, "safetensors")[0]))
        else:
            arrays = {k: np.load(f) for k, f in zip(names, array_files(folder, i, names, "npy"))}
        for k in names:
            parts[k].append(arrays[k])
    return {"ids": ids, **{k: np.concatenate(v) for k, v in parts.items()}}


# -- search ---------------------------------------------------------------------------------------------------

def itc_scores(image_embeds_proj: np.ndarray, text_feat: np.ndarray) -> np.ndarray:
    """[N, Q, D] x [T, D] -> [T, N]: for each text, each image's ITC similarity, max over the Q queries of the
    dot product of normalised vectors (the reference's sim_t2i without the temperature)."""
    return np.einsum("nqd,td->tnq", image_embeds_proj.astype(np.float32), text_feat.astype(np.float32)).max(-1)


def search(image_embeds_proj: np.ndarray, text_embeds_proj: np.ndarray, k: int = 10):
    """The top `k` images for each text: text_embeds_proj [T, L, D] (row 0, [CLS], is used) or [T, D] ->
    (scores [T, k], image indices [T, k]), best first, ties to the smaller index."""
    text_feat = text_embeds_proj[:, 0] if text_embeds_proj.ndim == 3 else text_embeds_proj
    sim = itc_scores(image_embeds_proj, text_feat)
    k = min(k, sim.shape[1])
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sim, order, axis=1), order
