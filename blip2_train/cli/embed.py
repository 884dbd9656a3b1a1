"""`blip2-embed`: stage-1 embeddings of a folder, an image list, tar shards and / or captions, in part files.

    blip2-embed --model exports/retrieval --images photos/ --out emb/                    # image_embeds_proj
    blip2-embed --model exports/retrieval --images list.txt --captions caps.txt --out emb/ --kinds all
    blip2-embed --model exports/retrieval --captions queries.txt --out q/                # text_embeds_proj
    torchrun --nproc_per_node 8 -m blip2_train.cli.embed --model exports/retrieval \\
        --shards 'shards/coco-{000000..000099}.tar' --out emb/ --format safetensors

Kinds (the reference's extract_features; `--kinds a,b` or `all`, default the projected ones of what is given):
image_embeds [N,Q,H], image_embeds_proj [N,Q,D], text_embeds [N,L,H], text_embeds_proj [N,L,D] (with text_mask
[N,L]; L = --max-txt-len), multimodal_embeds [N,Q,H] (images with their captions).
Inputs: --images a folder (read recursively, sorted; id = the path inside it) or a text file of image paths, one a
line (relative ones from the file's folder; id = the line); --captions a text file, one caption a line, or
`id<TAB>caption` lines; with --images, a caption goes to the image its id names, or (no ids) to the image in the
same position; alone, its texts are embedded (id = the line's id, else its number). --shards (a folder, glob or
brace pattern): the samples' images by key (id = the key) and their caption (.json `caption`, first of a list, or
.txt).
Output in --out: part-NNNNNN.<kind>.npy (or part-NNNNNN.safetensors) with part-NNNNNN.json (its ids in row
order, what it skipped); a part is --shard-size consecutive inputs (one input shard with --shards), so the parts
are the same on any number of processes: under torchrun each rank does the parts i with i % world == rank.
manifest.json (model, kinds, shapes, counts, skipped) comes last. A run killed or stopped is finished by the same
command: finished parts are kept, the others redone; other arguments for a folder already in use are refused.
An image that cannot be read is skipped, named, counted in the summary and listed in manifest.json.

exit status: 0 everything embedded; 3 some inputs skipped, the others done; 2 an error (bad arguments, a missing
input, a model that is not a stage-1 export): nothing done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from blip2_train.utils.errors import ConfigError, DataError

EXIT_SKIPPED = 3
ARGS_RECORD = "embed_args.json"  # the arguments the folder's parts were made with: a resume must match them


@dataclass
class Part:
    """Consecutive inputs written together: (id, image path or None, text or None) each; or one tar shard."""
    index: int
    items: list = field(default_factory=list)
    shard: str | None = None


def parse_args(argv):
    p = argparse.ArgumentParser(prog="blip2-embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="stage-1 export (Blip2ForImageTextRetrieval)")
    p.add_argument("--images", default=None, help="folder of images, or a text file of image paths")
    p.add_argument("--shards", default=None, help="WebDataset shards: folder, glob or brace pattern")
    p.add_argument("--captions", default=None, help="text file: a caption a line, or id<TAB>caption")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--kinds", default=None, help="comma-separated kinds, or 'all' (default: the projected ones)")
    p.add_argument("--format", default="npy", help="npy (one file per kind and part) or safetensors")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=1000, help="inputs per output part")
    p.add_argument("--max-txt-len", type=int, default=35, help="text tokens kept (retrieval's 35)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


# -- inputs ------------------------------------------------------------------------------------------------------

def list_images(spec: str, note) -> list[tuple[str, str]]:
    """-> [(id, path)]: a folder's image files, sorted (id: the path inside it), or a list file's lines."""
    from blip2_train.cli.generate import named
    from blip2_train.data.image_folder import image_extensions

    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        exts = image_extensions()
        others = [f.relative_to(p).as_posix() for f in files if f.suffix.lower() not in exts]
        if others:
            note(f"{p}: left out {len(others)} file(s) that are not images by their extension: {named(others)}")
        images = [(f.relative_to(p).as_posix(), str(f)) for f in files if f.suffix.lower() in exts]
        if not images:
            raise DataError(f"--images {p}: no image files in this folder (extensions PIL decodes, e.g. .jpg .png)")
        return images
    if not p.is_file():
        raise DataError(f"--images {p}: no such folder or file")
    try:
        lines = [l.strip() for l in p.read_text().splitlines()]
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"--images {p}: not a text file of image paths ({e})") from e
    images = [(l, l if os.path.isabs(l) else str(p.parent / l)) for l in lines if l]
    if not images:
        raise DataError(f"--images {p}: the list names no image")
    return images


def read_captions(path: str) -> list[tuple[str | None, str]]:
    """-> [(id or None, caption)] for each non-empty line; ids either on every line or on none."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"--captions {p}: no such file") from None
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"--captions {p}: not a text file ({e})") from e
    out, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        key, tab, text = line.partition("\t")
        out.append((key.strip(), text) if tab else (None, line))
        if (out[-1][0] is None) != (out[0][0] is None):
            raise DataError(f"{p}:{n}: give an id<TAB>caption on every line or on none")
        if tab and out[-1][0] in seen:
            raise DataError(f"{p}:{n}: id {out[-1][0]!r} given twice (one caption per id)")
        seen.add(out[-1][0])
    if not out:
        raise DataError(f"--captions {p}: no caption in this file")
    return out


def pair(images: list[tuple[str, str]], captions: list[tuple[str | None, str]], where: str) -> list[str]:
    """The caption of each image: by id when the captions have ids, else by position."""
    if captions[0][0] is not None:
        by_id = dict(captions)
        missing = [i for i, _ in images if i not in by_id]
        if missing:
            raise DataError(f"{where}: no caption for image {missing[0]!r} ({len(missing)} image(s) without one; "
                            "an id<TAB>caption line names an image by its id)")
        return [by_id[i] for i, _ in images]
    if len(captions) != len(images):
        raise DataError(f"{where}: {len(captions)} captions for {len(images)} images (one a line, in the images' "
                        "order; or name each image: id<TAB>caption)")
    return [c for _, c in captions]


def make_parts(a, note) -> tuple[list[Part], bool, bool, dict]:
    """-> (parts, images given, texts given, what identifies the inputs)."""
    from blip2_train.data.datamodule import expand_urls

    given = [k for k in ("images", "shards") if getattr(a, k)]
    if len(given) > 1:
        raise ConfigError("give --images or --shards, not both")
    if not given and not a.captions:
        raise ConfigError("nothing to embed: give --images, --shards or --captions")
    if a.shards:
        if a.captions:
            raise ConfigError("--shards carry their captions: give no --captions with them")
        urls = expand_urls(a.shards)
        return [Part(i, shard=u) for i, u in enumerate(urls)], True, True, {"shards": urls}
    images = list_images(a.images, note) if a.images else None
    captions = read_captions(a.captions) if a.captions else None
    if images is not None:
        texts = pair(images, captions, a.captions) if captions else [None] * len(images)
        items = [(i, src, t) for (i, src), t in zip(images, texts)]
    else:
        items = [(key if key is not None else str(n), None, t) for n, (key, t) in enumerate(captions, 1)]
    ident = hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]
    size = a.shard_size
    parts = [Part(i, items[s:s + size]) for i, s in enumerate(range(0, len(items), size))]
    return parts, images is not None, captions is not None, {"items": len(items), "items_sha": ident}


def shard_items(url: str, need_image: bool, need_text: bool, skipped: list):
    """-> (id, encoded image or None, caption or None) for each usable sample of a tar shard, in its order; a
    sample without what is asked for, or an unreadable rest of the shard, is a counted skip."""
    from webdataset.tariterators import tarfile_samples

    from blip2_train.data.decode import SampleDecoder

    def unreadable(exn: Exception) -> bool:
        skipped.append({"id": url, "reason": f"{url}: unreadable shard ({type(exn).__name__}: {exn}); rest skipped"})
        return True

    captions_of = SampleDecoder(transform=None).captions_of
    for s in tarfile_samples(iter([{"url": url}]), handler=unreadable):
        key = s.get("__key__", "?")
        image = s.get("jpg") or s.get("jpeg") or s.get("png") or s.get("webp")
        caps, _ = captions_of(s)
        if need_image and image is None:
            skipped.append({"id": key, "reason": f"{url}: sample {key} has no image"})
        elif need_text and not caps:
            skipped.append({"id": key, "reason": f"{url}: sample {key} has no caption"})
        else:
            yield key, image, caps[0] if caps else None


# -- the model and the folder's record ------------------------------------------------------------------------

def check_stage1(path: str) -> None:
    """Before any weight is read: the directory is a stage-1 export."""
    from blip2_train.models.export import export_meta

    p = Path(path)
    if not (p / "config.json").is_file():
        raise DataError(f"--model {p}: no config.json here (give a stage-1 export directory)")
    arch = (json.loads((p / "config.json").read_text()).get("architectures") or ["?"])[0]
    stage = export_meta(p).get("stage")
    if stage not in (None, 1) or arch != "Blip2ForImageTextRetrieval":
        what = f"a stage-{stage} export" if stage else f"a {arch} directory"
        raise ConfigError(f"--model {p} is {what}: blip2-embed needs a stage-1 export (Blip2ForImageTextRetrieval, "
                          "what blip2-export writes for a stage-1 run)")


def run_record(a, kinds, inputs: dict) -> dict:
    model = Path(a.model).resolve()
    weights = {f.name: f.stat().st_size for f in sorted(model.iterdir()) if f.suffix in (".safetensors", ".bin")}
    config = hashlib.sha256((model / "config.json").read_bytes()).hexdigest()[:16]
    return {"model": str(model), "model_config_sha": config, "model_weights": weights, "kinds": list(kinds),
            "format": a.format, "shard_size": a.shard_size if not a.shards else None, "max_txt_len": a.max_txt_len,
            **inputs}


def check_record(out: Path, record: dict) -> None:
    """A folder made with other arguments is refused, naming what differs; ours is (re)written as it is."""
    path = out / ARGS_RECORD
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        diff = [k for k in record if old.get(k) != record[k]]
        if diff:
            shown = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(record[k])}" for k in diff[:3])
            raise ConfigError(f"--out {out} holds embeddings made with other arguments ({shown}): give another "
                              "--out, or delete it to start over")


def _short(v) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


# -- the run -----------------------------------------------------------------------------------------------------

def parse_kinds(spec: str | None, images: bool, texts: bool, shards: bool):
    from blip2_train.eval.embedding import check_kinds

    if spec is None:  # what a retrieval index reads; with shards, their images
        return check_kinds((["image_embeds_proj"] if images else []) +
                           (["text_embeds_proj"] if texts and not shards else []), images, texts)
    if spec == "all":
        return check_kinds(None, images, texts)
    return check_kinds([k.strip() for k in spec.split(",") if k.strip()], images, texts)


def embed_part(part: Part, model, kinds, a, bar, skipped: list) -> tuple[dict, list[str]]:
    """One part -> (its arrays, its ids); its unreadable images added to `skipped`."""
    from tqdm import tqdm

    import torch

    from blip2_train.eval.embedding import IMAGE_KINDS, MULTIMODAL_KINDS, TEXT_KINDS, embed_all

    need_image = any(k in kinds for k in IMAGE_KINDS + MULTIMODAL_KINDS)
    need_text = any(k in kinds for k in TEXT_KINDS + MULTIMODAL_KINDS)
    items = shard_items(part.shard, need_image, need_text, skipped) if part.shard else part.items
    ids, pixels, texts = [], [], []
    for key, image, text in items:
        bar.update(1)
        if need_image:
            try:
                pixels.append(model.pixel(image, f"{part.shard}::{key}" if part.shard else str(image)))
            except DataError as e:
                tqdm.write(f"skipped {e}", file=sys.stderr)
                skipped.append({"id": key, "reason": str(e)})
                continue
        ids.append(key)
        texts.append(text)
    px = (torch.stack(pixels) if pixels else torch.zeros(0, 3, 1, 1)) if need_image else None
    arrays = embed_all(model.model, model.tokenizer, kinds, px, texts if need_text else None, a.max_txt_len,
                       a.batch_size, fixed=True)
    return arrays, ids


def embed(a) -> int:
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    from blip2_train.api import load
    from blip2_train.cli.generate import named
    from blip2_train.distributed.launch import init_distributed, shutdown_distributed
    from blip2_train.eval.embedding import FORMATS, feature_shapes, part_name, read_part_record, write_part
    from blip2_train.utils.io import write_json_atomic

    for key, low in (("batch_size", 1), ("shard_size", 1), ("max_txt_len", 2)):
        if getattr(a, key) < low:
            raise ConfigError(f"--{key.replace('_', '-')} {getattr(a, key)}: must be at least {low}")
    if a.format not in FORMATS:
        raise ConfigError(f"--format {a.format}: one of {', '.join(FORMATS)}")
    check_stage1(a.model)
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        print(line, file=sys.stderr)

    parts, images, texts, inputs = make_parts(a, note)
    kinds = parse_kinds(a.kinds, images, texts, bool(a.shards))
    out = Path(a.out)
    record = run_record(a, kinds, inputs)
    check_record(out, record)

    device, created = init_distributed(a.device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        out.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            write_json_atomic(out / ARGS_RECORD, record, sort_keys=False)
        model = load(a.model, device=device)
        shapes = feature_shapes(model.model, kinds, a.max_txt_len)
        mine = [p for p in parts if p.index % world == rank]
        todo = [p for p in mine if read_part_record(out, p.index, shapes, a.format) is None]
        total = None if a.shards else sum(len(p.items) for p in todo)
        written = 0
        with tqdm(total=total, desc="embed", unit="input", file=sys.stderr, disable=rank != 0) as bar:
            for p in todo:
                skipped: list = []
                arrays, ids = embed_part(p, model, kinds, a, bar, skipped)
                rec = {"ids": ids, "rows": len(ids), "skipped": skipped}
                if p.shard:
                    rec["shard"] = p.shard
                write_part(out, p.index, arrays, rec, a.format)
                written += 1
        kept = len(mine) - len(todo)
        counts = torch.tensor([written, kept])
        if created:
            dist.all_reduce(counts)  # the summary's "written now / kept" over every rank
            dist.barrier()  # every part on disk before the manifest reads them
        records = [read_part_record(out, p.index, shapes, a.format) for p in parts]
        lost = [part_name(p.index) for p, r in zip(parts, records) if r is None]
        if lost:
            raise DataError(f"{out}: {len(lost)} part(s) missing after the run: {named(lost, 5)}")
        skipped = [s for r in records for s in r["skipped"]]
        rows = sum(r["rows"] for r in records)
        if rank == 0:
            manifest = {"model": record["model"], "kinds": list(kinds), "format": a.format,
                        "arrays": {k: list(s) for k, s in shapes.items()},
                        "counts": {"embedded": rows, "skipped": len(skipped), "parts": len(parts)},
                        "skipped": skipped, "max_txt_len": a.max_txt_len,
                        "parts": [{"index": p.index, "name": part_name(p.index), "rows": r["rows"],
                                   **({"shard": p.shard} if p.shard else {})} for p, r in zip(parts, records)]}
            write_json_atomic(out / "manifest.json", manifest, sort_keys=False)
            what = "images" if images else "texts"
            line = (f"blip2-embed: {rows} {what} embedded ({', '.join(kinds)}) in {len(parts)} part(s)"
                    f" ({int(counts[0])} written now, {int(counts[1])} kept from an earlier run)"
                    f", {len(skipped)} skipped" + (f": {named([s['id'] for s in skipped], 5)}" if skipped else ""))
            print(f"{line}; output: {out} (manifest.json); search it: blip2_train.eval.embedding.search "
                  "(docs/usage.md, Embeddings)", file=sys.stderr)
    except BaseException:
        if created:  # no barrier: the other ranks may never reach one (torchrun ends them on this exit)
            dist.destroy_process_group()
        raise
    if created:
        shutdown_distributed()
    if skipped and not rows:
        raise DataError(f"none of the {len(skipped)} input(s) could be embedded (each named above)")
    return EXIT_SKIPPED if skipped else 0


def main(argv: list[str] | None = None) -> int:
    from blip2_train.cli.errors import run_with_one_line_errors
    from blip2_train.cli.log import setup_logging

    a = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    return run_with_one_line_errors(embed, a)


if __name__ == "__main__":
    raise SystemExit(main())
