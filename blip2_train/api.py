"""The Python API: load an export (or an official BLIP-2 transformers directory), then caption, answer or score.

    import blip2_train
    m = blip2_train.load("exports/caption")                 # stage 2: caption / answer
    m.caption(["a.jpg", "b.jpg"])                          # -> ["a dog on a bench", ...]
    m.caption("a.jpg")                                     # one image -> one caption
    m.answer(["a.jpg"], ["what colour is the dog?"])       # -> ["brown"]
    i = blip2_train.load("exports/instruct")                # instruction-tuned: the prompt is the instruction
    i.generate("a.jpg", "What is unusual about this image?")
    i.generate("a.jpg", "And its colour?", context=[("What is on the bench?", "a dog")])  # earlier turns
    s = blip2_train.load("exports/retrieval")               # stage 1: score
    s.score(["a.jpg"], ["a dog on a bench"], head="itm")   # -> [match logit] per (image, text) pair
    s.embed(images=["a.jpg"], texts=["a dog"])              # -> {"image_embeds": [1, 32, 768] numpy, ...}
    s.classify("a.jpg", ["dog", "cat"])                    # zero-shot -> [{"label": "dog", "itc": 0.41}, ...]

The same code path as `blip2-eval` (the image decoding and transform of evaluation, the prompt inputs and decoding
of the captioning and VQA evaluations), so the same images give the same texts. Captions decode as the export
records (`blip2_train.json`'s generate_kwargs: the run's eval.generate) over the captioning evaluation's defaults.
`blip2-generate` is this API on files, folders and shards.

Images: a path, encoded bytes or a PIL image gives one result; a list (or tuple) of them a list, `[]` for `[]`.
The texts that go with them (prompts, questions, texts) take the same form: one string for one image, a list of
the same length for a list. An image that cannot be read raises a DataError naming it (`on_error="raise"`, the
default); with `on_error="skip"` its result is None and the others are computed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from blip2_train.data.eval_sets import load_eval_image
from blip2_train.data.transforms import EvalTransform
from blip2_train.eval.vqa import VQA_GENERATION, question_prompt
from blip2_train.eval.captioning import CAPTION_GENERATION
from blip2_train.eval.generation import INSTRUCT_GENERATION, autocast, generate_texts
from blip2_train.models.export import export_meta
from blip2_train.utils.errors import CheckpointError, DataError

__all__ = ["load", "Blip2Captioner", "Blip2Scorer", "VQA_PROMPT"]

VQA_PROMPT = "Question: {} Short answer:"  # the reference's zero-shot template (conf/experiment/vqa_*_eval.yaml)


def _config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{path} has no config.json: not an export or a transformers BLIP-2 directory")
    return json.loads(cfg.read_text())


def _image_size(path: Path, cfg: dict) -> int:
    meta = export_meta(path)
    if meta.get("image_size"):
        return int(meta["image_size"])
    pre = path / "preprocessor_config.json"
    if pre.exists():
        size = json.loads(pre.read_text()).get("size", {})
        return int(size.get("height", size) if isinstance(size, dict) else size)
    return int(cfg["vision_config"]["image_size"])


def load(path: str | Path, device: str | torch.device | None = None, dtype: str | None = None):
    """A stage-2 directory (`Blip2ForConditionalGeneration`: our export or an official one) -> Blip2Captioner;
    a stage-1 export (`Blip2ForImageTextRetrieval`) -> Blip2Scorer. `dtype`: the frozen parts' dtype (default:
    what the directory records; "float32" on a CPU)."""
    p = Path(str(path))
    if not p.is_dir():
        raise CheckpointError(f"{p} is not a directory (load takes an export or a transformers BLIP-2 directory)")
    cfg = _config(p)
    arch = (cfg.get("architectures") or [""])[0]
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if export_meta(p).get("stage") == 1 or arch == "Blip2ForImageTextRetrieval":
        return Blip2Scorer(p, cfg, dev)
    if export_meta(p).get("stage") in (2, 3) or arch in ("Blip2ForConditionalGeneration",
                                                          "InstructBlipForConditionalGeneration"):
        return Blip2Captioner(p, cfg, dev, dtype)
    raise CheckpointError(f"{p}: config.json names {arch or 'no architecture'}; expected a BLIP-2 export "
                          "(Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration or "
                          "Blip2ForImageTextRetrieval)")


def _is_one_image(x) -> bool:
    return isinstance(x, (str, bytes, bytearray, os.PathLike)) or hasattr(x, "convert")


def _as_list(images) -> tuple[list, bool]:
    """-> (the images as a list, whether one image was given)."""
    if _is_one_image(images):
        return [images], True
    if isinstance(images, (list, tuple)):
        return list(images), False
    raise TypeError(f"images: give a path, encoded bytes or a PIL image, or a list of them (not "
                    f"{type(images).__name__})")


def _texts(texts, n: int, one: bool, what: str) -> list[str]:
    """The texts that go with the images, in the images' form: one string for one image, a list for a list."""
    if one:
        if not isinstance(texts, str):
            raise TypeError(f"one image takes one {what} (a string), not {type(texts).__name__}")
        return [texts]
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"a list of images takes a list of {what}s, one per image (not {type(texts).__name__})")
    if len(texts) != n:
        raise ValueError(f"{n} images but {len(texts)} {what}s")
    return list(texts)


def _check_on_error(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")


def _label(im, i: int) -> str:
    if isinstance(im, (str, os.PathLike)):
        return str(im)
    return f"images[{i}] ({'encoded bytes' if isinstance(im, (bytes, bytearray)) else 'PIL image'})"


class _Images:
    def __init__(self, path: Path, cfg: dict, device: torch.device):
        self.path, self.device = path, device
        self.transform = EvalTransform(_image_size(path, cfg))

    def pixel(self, image, name: str | None = None) -> torch.Tensor:
        """One path, encoded bytes or PIL image -> [3, H, W], decoded as evaluation decodes it (EXIF orientation
        applied); DataError naming it (`name`, else the path) if it cannot be read."""
        if not _is_one_image(image):
            raise TypeError(f"an image is a path, encoded bytes or a PIL image, not {type(image).__name__}")
        src = image if isinstance(image, (bytes, bytearray)) or hasattr(image, "convert") else str(image)
        return load_eval_image(src, self.transform, name=name or _label(image, 0))

    def pixels(self, images) -> torch.Tensor:
        """Paths, encoded bytes or PIL images -> [B, 3, H, W], decoded as evaluation decodes them."""
        images, _ = _as_list(images)
        return torch.stack([self.pixel(im, _label(im, i)) for i, im in enumerate(images)])

    def _decode(self, images: list, on_error: str) -> tuple[list[int], torch.Tensor | None]:
        """Each image decoded on its own (a bad one cannot take the others down) -> (indices of the usable
        ones, their pixels); a bad one raises (on_error="raise") or is left out (on_error="skip")."""
        _check_on_error(on_error)
        keep, out = [], []
        for i, im in enumerate(images):
            try:
                out.append(self.pixel(im, _label(im, i)))
            except DataError:
                if on_error == "raise":
                    raise
                continue
            keep.append(i)
        return keep, (torch.stack(out) if out else None)

    @staticmethod
    def _place(n: int, keep: list[int], results: list, one: bool):
        full = [None] * n
        for i, r in zip(keep, results):
            full[i] = r
        return full[0] if one else full


class Blip2Captioner(_Images):
    """A stage-2 or instruction-tuned model: `caption(images)`, `answer(images, questions)`,
    `generate(images, prompts)` (an instruction-tuned model reads each prompt as the instruction, in the Q-Former
    and the LLM)."""

    def __init__(self, path: Path, cfg: dict, device: torch.device, dtype: str | None = None):
        from blip2_train.models.llm import load_llm_tokenizer

        super().__init__(path, cfg, device)
        meta = export_meta(path)
        frozen = dtype or cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
        # an adapter-only export: the LLM is the base it names, its LoRA adapter under llm_adapter/
        apart = {k: v for k, v in (meta.get("adapter") or {}).items() if k not in ("merged", "base", "dir")}
        apart = apart if (meta.get("adapter") or {}).get("merged") is False else None
        common = dict(llm=str(meta["adapter"]["base"] if apart else path), tokenizer=str(path),
                      vision=cfg["vision_config"], qformer=cfg["qformer_config"],
                      num_query_tokens=int(cfg["num_query_tokens"]), llm_dtype=frozen,
                      vision_dtype=dtype or cfg["vision_config"].get("dtype") or "float32",
                      ln_vision_eps=meta.get("ln_vision_eps"))
        self.instruct = cfg.get("model_type") == "instructblip"
        if self.instruct:
            from blip2_train.models.build_instruct import build_instruct_model

            text = {"qformer_tokenizer": str(path / "qformer_tokenizer"), "max_txt_len": meta.get("max_txt_len")}
            self.model = build_instruct_model(**common, instruct_checkpoint=str(path), text=text, adapter=apart)
        else:
            from blip2_train.models.build_stage2 import build_stage2_model

            self.model = build_stage2_model(**common, stage2_checkpoint=str(path), adapter=apart)
        if apart:  # the builder read the adapter from the export; merged, it is the LLM generation runs
            from blip2_train.models.adapters import merge_adapter

            merge_adapter(self.model.llm)
        # where generation stops: what the export recorded (OPT: "\n"), else the config's (official: "\n" too)
        end = meta.get("end_token_id", cfg.get("text_config", {}).get("eos_token_id"))
        if end is not None:
            self.model.end_token_id = int(end)
        self.model.to(device).eval()
        self.tokenizer = load_llm_tokenizer(path)
        if self.instruct:  # captions asked for with the paper's first caption instruction; open answers decoded as
            # the export records (the reference's InstructBLIP decoding unless the run set eval.instruct_generate)
            self.prompt = meta.get("prompt") or "A short image caption:"
            self.caption_decoding = dict(CAPTION_GENERATION)
            self.instruct_decoding = {**INSTRUCT_GENERATION, **dict(meta.get("generate_kwargs") or {})}
        else:
            self.prompt = meta.get("prompt", "")  # the prompt the export was fine-tuned with ("a photo of")
            # the decoding the run evaluated its captions with, so captions here are blip2-eval's
            self.caption_decoding = {**CAPTION_GENERATION, **dict(meta.get("generate_kwargs") or {})}
            self.instruct_decoding = {}

    def generate(self, images, prompts, on_error: str = "raise", context=None, **generate_kwargs):
        """Texts continuing each image's prompt (generate_kwargs go to the LLM's generate, over the export's
        instruction decoding for an instruction-tuned model, which reads each prompt as its instruction; `context`
        (instruction-tuned models only)
        gives each image's earlier turns, [(question, answer), ...], which go before the instruction as
        `Question: q1 Answer: a1 ... Question: <prompt> Answer:` (the multi-turn format of its training data)."""
        images, one = _as_list(images)
        prompts = _texts(prompts, len(images), one, "prompt")
        if context is not None:
            from blip2_train.data.annotations import llava_instruction

            if not self.instruct:
                raise ValueError("context needs an instruction-tuned model (a stage-2 model continues its prompt)")
            turns = [context] if one else list(context)
            if len(turns) != len(prompts):
                raise ValueError(f"context: {len(turns)} conversation(s) for {len(prompts)} image(s)")
            prompts = [llava_instruction([tuple(t) for t in c], p) for c, p in zip(turns, prompts)]
        return self._generate(images, one, prompts, on_error, {**self.instruct_decoding, **generate_kwargs})

    def _generate(self, images: list, one: bool, prompts: list, on_error: str, decoding: dict):
        keep, pixels = self._decode(images, on_error)
        texts = [] if pixels is None else generate_texts(self.model, self.tokenizer, pixels,
                                                         [prompts[i] for i in keep], decoding)
        return self._place(len(images), keep, texts, one)

    def caption(self, images, prompt: str | None = None, on_error: str = "raise", **generate_kwargs):
        """Captions with the export's prompt and decoding (`caption_decoding`: what the export records over the
        captioning evaluation's beam 5, 8-30 new tokens); keyword arguments override it."""
        p = self.prompt if prompt is None else prompt
        if not isinstance(p, str):
            raise TypeError(f"prompt is one string for every image, not {type(p).__name__}")
        imgs, one = _as_list(images)
        return self._generate(imgs, one, [p] * len(imgs), on_error, {**self.caption_decoding, **generate_kwargs})

    def answer(self, images, questions, template: str = VQA_PROMPT, on_error: str = "raise", **generate_kwargs):
        """Short answers with the VQA evaluation's template and decoding (beam 5, 1-10 new tokens). Questions
        are used as given (the VQA evaluation lower-cases them: `blip2_train.data.vqa.clean_question`)."""
        imgs, one = _as_list(images)
        qs = _texts(questions, len(imgs), one, "question")
        prompts = [question_prompt(template, q) for q in qs]
        return self._generate(imgs, one, prompts, on_error, {**VQA_GENERATION, **generate_kwargs})


class Blip2Scorer(_Images):
    """A stage-1 model: `score(images, texts, head)` for each (images[i], texts[i]) pair, as retrieval scores them:
    ITC = the highest query-text cosine similarity; ITM = the match logit."""

    def __init__(self, path: Path, cfg: dict, device: torch.device):
        from blip2_train.models.build_stage1 import build_stage1_model
        from blip2_train.models.tokenizer import load_qformer_tokenizer

        super().__init__(path, cfg, device)
        self.model = build_stage1_model(tokenizer=str(path), vision=cfg["vision_config"],
                                        qformer=cfg["qformer_config"], num_query_tokens=int(cfg["num_query_tokens"]),
                                        embed_dim=int(cfg["image_text_hidden_size"]), stage1_checkpoint=str(path),
                                        ln_vision_eps=export_meta(path).get("ln_vision_eps"))
        self.model.to(device).eval()
        self.tokenizer = load_qformer_tokenizer(path)

    @torch.no_grad()
    def score(self, images, texts, head: str = "itc", max_txt_len: int = 35, on_error: str = "raise"):
        from blip2_train.data.captions import clean_caption
        from blip2_train.eval.metrics.retrieval import itc_similarity

        if head not in ("itc", "itm"):
            raise ValueError(f"head must be 'itc' or 'itm', not {head!r}")
        images, one = _as_list(images)
        texts = _texts(texts, len(images), one, "text")
        keep, pixels = self._decode(images, on_error)
        if pixels is None:
            return self._place(len(images), keep, [], one)
        tok = self.tokenizer([clean_caption(texts[i], 50) for i in keep], padding="longest", truncation=True,
                             max_length=max_txt_len, return_tensors="pt")
        ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
        with autocast(self.device):
            embeds, feats = self.model.retrieval_image_embeds(pixels.to(self.device))
            if head == "itm":
                scores = self.model.itm_forward(embeds.float(), ids, mask)[:, 1].float().tolist()
            else:
                text_feat = self.model.retrieval_text_feat(ids, mask).float()
        if head == "itc":
            scores = torch.diagonal(itc_similarity(feats.float(), text_feat)).tolist()
        return self._place(len(images), keep, scores, one)

    def classify(self, images, labels, templates=None, topk: int = 5, itm_topk: int = 0, ensemble: str = "mean",
                 on_error: str = "raise", batch_size: int = 64):
        """Zero-shot classification among `labels` (as `blip2-eval experiment=classify_zeroshot_eval` scores):
        each image's `topk` labels, best first, as {"label", "itc"} (+ "itm", the match probability, for the
        `itm_topk` labels ITM re-ranked). Each label fills every template (default "a photo of a {}."); the
        prompts' features are averaged (ensemble="mean", CLIP's) or the best prompt counts ("max")."""
        from blip2_train.eval.classify import ZeroShotClassifier

        if topk < 1 or itm_topk < 0:
            raise ValueError(f"topk must be >= 1 and itm_topk >= 0 (got {topk}, {itm_topk})")
        head = ZeroShotClassifier(self.model, self.tokenizer, labels, templates, ensemble)
        images, one = _as_list(images)
        keep, pixels = self._decode(images, on_error)
        results = [] if pixels is None else [
            r for s in range(0, pixels.shape[0], batch_size)
            for r in head.results(head.rank(pixels[s : s + batch_size], topk, itm_topk))]
        return self._place(len(images), keep, results, one)

    def embed(self, images=None, texts=None, kinds=None, max_txt_len: int = 35, batch_size: int = 32,
              on_error: str = "raise") -> dict:
        """The reference's extract_features as numpy arrays, every one with its batch dimension (one image or
        one string is a batch of one): {kind: float32 [N, ...]} for `kinds` (default: every kind the inputs
        give; `blip2_train.eval.embedding.KINDS`), plus `text_mask` (int8 [N, L]) with the text kinds. Images and
        texts given together are pairs (row i of every kind is pair i) and also give `multimodal_embeds`. Texts
        are cleaned and cut to `max_txt_len` tokens as `score` reads them, padded to the longest of the call.
        With on_error="skip" an unreadable image's row (and its text's) is left out and `index` (int64 [N])
        gives the input position of each row."""
        from blip2_train.eval.embedding import check_kinds, embed_all

        _check_on_error(on_error)
        imgs, one = _as_list(images) if images is not None else (None, False)
        if texts is not None:
            texts = _texts(texts, len(imgs), one, "text") if imgs is not None else \
                [texts] if isinstance(texts, str) else list(texts)
        kinds = check_kinds(kinds, imgs is not None, texts is not None)
        index = list(range(len(imgs if imgs is not None else texts)))
        pixels = None
        if imgs is not None:
            index, pixels = self._decode(imgs, on_error)
            pixels = pixels if pixels is not None else torch.zeros(0, 3, 1, 1)
        out = embed_all(self.model, self.tokenizer, kinds, pixels, None if texts is None else
                        [texts[i] for i in index], max_txt_len, batch_size)
        if on_error == "skip":
            import numpy as np

            out["index"] = np.asarray(index, dtype=np.int64)
        return out
