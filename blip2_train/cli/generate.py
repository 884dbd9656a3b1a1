"""`blip2-generate`: captions or answers for image files, folders or WebDataset shards, as JSON lines.

    blip2-generate exports/caption photos/ --out captions.jsonl                # the export's prompt ("a photo of")
    blip2-generate exports/caption a.jpg --prompt "a painting of"               # free text: continued
    blip2-generate exports/stage2 shard-000000.tar --question "what is the man holding?"
    blip2-generate exports/stage2 --questions questions.jsonl                  # {"image": path, "question": q} lines

A question goes into the `{}` of `--prompt` (default: the reference's "Question: {} Short answer:") and is decoded
as the VQA evaluation decodes (beam 5, 1-10 new tokens); captions as the captioning evaluation (beam 5, 8-30).
The model is a stage-2 export or an official BLIP-2 transformers directory (`blip2_train.api.load`).
Each line: {"image", "prompt", "text"} (+ "question").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path

from blip2_train.utils.errors import Blip2TrainError, ConfigError, DataError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def iter_images(inputs: list[str]):
    """-> (name, path or encoded bytes) for each image: files as given, folders sorted (recursively), shards by
    member name. Anything else is an error naming it (nothing skipped silently)."""
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise DataError(f"{p}: no image files ({', '.join(IMAGE_EXTS)}) in this folder")
            yield from ((str(f), str(f)) for f in files)
        elif p.suffix == ".tar":
            if not p.exists():
                raise DataError(f"shard not found: {p}")
            with tarfile.open(p) as tar:
                for m in sorted(tar.getmembers(), key=lambda m: m.name):
                    if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTS:
                        yield f"{p}::{m.name}", tar.extractfile(m).read()
        elif p.is_file():
            yield str(p), str(p)
        else:
            raise DataError(f"input not found: {p} (give image files, folders or .tar shards)")


def read_questions(path: str) -> list[tuple[str, str]]:
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out.append((str(rec["image"]), str(rec["question"])))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{n}: expected a JSON object with 'image' and 'question' ({e})") from e
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="blip2-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="stage-2 export or official BLIP-2 transformers directory")
    p.add_argument("inputs", nargs="*", help="image files, folders, .tar shards")
    p.add_argument("--prompt", default=None, help="free text to continue, or a question template with {}")
    p.add_argument("--question", default=None, help="ask this question about every image")
    p.add_argument("--questions", default=None, help='JSON lines {"image": path, "question": text}')
    p.add_argument("--out", default="-", help="JSON lines output file (default: stdout)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-beams", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--min-new-tokens", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="frozen parts' dtype (default: the directory's)")
    return p.parse_args(argv)


def jobs(a) -> list[tuple[str, object, str | None]]:
    """-> [(name, image, question or None)]."""
    if a.questions:
        if a.inputs or a.question:
            raise ConfigError("--questions names its images: give no inputs and no --question with it")
        return [(img, img, q) for img, q in read_questions(a.questions)]
    if not a.inputs:
        raise ConfigError("no inputs: give image files, folders or .tar shards (or --questions FILE)")
    return [(name, src, a.question) for name, src in iter_images(a.inputs)]


def generate(a) -> int:
    from tqdm import tqdm

    from blip2_train.api import VQA_PROMPT, Blip2Captioner, load
    from blip2_train.eval.vqa import VQA_GENERATION, check_template, question_prompt
    from blip2_train.eval.captioning import CAPTION_GENERATION

    asks = a.question is not None or a.questions is not None
    template = a.prompt if a.prompt is not None else VQA_PROMPT
    if asks:
        check_template(template)
    elif a.prompt is not None and "{}" in a.prompt:
        raise ConfigError(f"--prompt {a.prompt!r} is a question template: give --question or --questions with it")
    todo = jobs(a)
    model = load(a.model, device=a.device, dtype=a.dtype)
    if not isinstance(model, Blip2Captioner):
        raise ConfigError(f"{a.model} is a stage-1 export: blip2-generate needs a stage-2 model")
    decoding = dict(VQA_GENERATION if asks else CAPTION_GENERATION)
    for key in ("num_beams", "max_new_tokens", "min_new_tokens"):
        if getattr(a, key) is not None:
            decoding[key] = getattr(a, key)
    caption_prompt = model.prompt if a.prompt is None else a.prompt
    out = sys.stdout if a.out == "-" else open(a.out, "w")
    try:
        for s in tqdm(range(0, len(todo), a.batch_size), desc="generate", unit="batch", file=sys.stderr):
            batch = todo[s : s + a.batch_size]
            prompts = [question_prompt(template, q) if q is not None else caption_prompt for _, _, q in batch]
            texts = model.generate([src for _, src, _ in batch], prompts, **decoding)
            for (name, _, q), prompt, text in zip(batch, prompts, texts):
                rec = {"image": name, "prompt": prompt, "text": text}
                if q is not None:
                    rec["question"] = q
                out.write(json.dumps(rec) + "\n")
            out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    from blip2_train.cli.errors import first_line
    from blip2_train.cli.log import setup_logging

    a = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    try:
        return generate(a)
    except (Blip2TrainError, OSError) as e:
        if os.environ.get("BLIP2_FULL_ERROR"):
            raise
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
