"""`blip2-generate`: captions or answers for image files, folders or WebDataset shards, as JSON lines.

    blip2-generate exports/caption photos/ --out captions.jsonl                # the export's prompt ("a photo of")
    blip2-generate exports/caption a.jpg --prompt "a painting of"               # free text: continued
    blip2-generate exports/stage2 shard-000000.tar --question "what is the man holding?"
    blip2-generate exports/stage2 --questions questions.jsonl                  # {"image": path, "question": q} lines
    blip2-generate exports/instruct photos/ --instruction "Describe the image in detail."

Captions decode as the export records (blip2_train.json's generate_kwargs, the run's eval.generate, over the
captioning evaluation's beam 5, 8-30 new tokens), so they are blip2-eval's captions. A question goes into the `{}`
of `--prompt` (default: the reference's "Question: {} Short answer:") and is decoded as the VQA evaluation decodes
(beam 5, 1-10 new tokens). --num-beams, --max-new-tokens and --min-new-tokens override either.
An instruction-tuned export reads the prompt (or the filled question template) as its instruction, in the Q-Former
and the LLM; --instruction gives one for every image, decoded as the export records (the reference's InstructBLIP
decoding unless the run set eval.instruct_generate: beam 5, up to 256 new tokens, repetition penalty 1.5).
The model is a stage-2 or InstructBLIP export, or an official (Instruct)BLIP-2 transformers directory
(`blip2_train.api.load`).
Folders are read recursively: every file with an extension PIL decodes; the other files are named on one line.
Each line: {"image", "prompt", "text"} (+ "question"). An image that cannot be read is skipped: named on stderr,
counted in the summary that ends every run.

exit status: 0 every image done; 3 some images skipped, the others done; 2 an error (bad arguments, a missing
input, no image readable): nothing done.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from collections import Counter
from pathlib import Path

from blip2_train.utils.errors import ConfigError, DataError

EXIT_SKIPPED = 3  # some images could not be read (each named on stderr); the others were done
MAX_NAMED = 20  # names listed in one line before "+N more"



def named(items: list[str], limit: int = MAX_NAMED) -> str:
    more = len(items) - limit
    return ", ".join(items[:limit]) + (f" (+{more} more)" if more > 0 else "")


def iter_images(inputs: list[str], note=lambda line: print(line, file=sys.stderr)):
    """-> (name, path or encoded bytes) for each image: files as given, folders sorted (recursively), shards by
    member name. What a folder or shard holds besides images is left out and said in one line (`note`); an input
    that does not exist is an error naming it."""
    from blip2_train.data.image_folder import image_extensions  # (torch: imported when a folder is read)

    exts = image_extensions()
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            images = [f for f in files if f.suffix.lower() in exts]
            others = [str(f.relative_to(p)) for f in files if f.suffix.lower() not in exts]
            if others:
                note(f"{p}: left out {len(others)} file(s) that are not images by their extension: {named(others)}")
            if not images:
                raise DataError(f"{p}: no image files in this folder (extensions PIL decodes, e.g. .jpg .png .gif "
                                ".tiff .webp)")
            yield from ((str(f), str(f)) for f in images)
        elif p.suffix == ".tar":
            if not p.exists():
                raise DataError(f"shard not found: {p}")
            try:
                with tarfile.open(p) as tar:
                    members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
                    others = Counter(Path(m.name).suffix or "(no extension)" for m in members
                                     if Path(m.name).suffix.lower() not in exts)
                    if others:
                        note(f"{p}: left out {sum(others.values())} member(s) that are not images: "
                             + ", ".join(f"{n} {ext}" for ext, n in sorted(others.items())))
                    for m in members:
                        if Path(m.name).suffix.lower() in exts:
                            yield f"{p}::{m.name}", tar.extractfile(m).read()
            except tarfile.TarError as e:
                raise DataError(f"{p}: not a readable tar shard ({e})") from e
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
    if not out:
        raise DataError(f"{path}: no questions in this file")
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="blip2-generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="stage-2 export or official BLIP-2 transformers directory")
    p.add_argument("inputs", nargs="*", help="image files, folders, .tar shards")
    p.add_argument("--prompt", default=None, help="free text to continue, or a question template with {}")
    p.add_argument("--question", default=None, help="ask this question about every image")
    p.add_argument("--instruction", default=None, help="instruction-tuned export: this instruction for every image")
    p.add_argument("--questions", default=None, help='JSON lines {"image": path, "question": text}')
    p.add_argument("--out", default="-", help="JSON lines output file (default: stdout)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-beams", type=int, default=None, help="default: the export's (captions), 5 (answers)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the export's (captions), 10 (answers)")
    p.add_argument("--min-new-tokens", type=int, default=None, help="default: the export's (captions), 1 (answers)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="frozen parts' dtype (default: the directory's)")
    return p.parse_args(argv)


def check_numbers(a) -> None:
    for key, low in (("batch_size", 1), ("num_beams", 1), ("max_new_tokens", 1), ("min_new_tokens", 0)):
        v = getattr(a, key)
        if v is not None and v < low:
            raise ConfigError(f"--{key.replace('_', '-')} {v}: must be at least {low}")


def jobs(a, note) -> list[tuple[str, object, str | None]]:
    """-> [(name, image, question or None)]."""
    if a.questions:
        if a.inputs or a.question:
            raise ConfigError("--questions names its images: give no inputs and no --question with it")
        return [(img, img, q) for img, q in read_questions(a.questions)]
    if not a.inputs:
        raise ConfigError("no inputs: give image files, folders or .tar shards (or --questions FILE)")
    return [(name, src, a.question) for name, src in iter_images(a.inputs, note)]


def generate(a) -> int:
    import logging

    import torch
    from tqdm import tqdm

    from blip2_train.api import VQA_PROMPT, Blip2Captioner, load
    from blip2_train.eval.generation import generate_texts
    from blip2_train.eval.vqa import VQA_GENERATION, check_template, question_prompt

    check_numbers(a)
    if a.instruction is not None and (a.question or a.questions or a.prompt):
        raise ConfigError("--instruction is the whole input: give no --prompt, --question or --questions with it")
    asks = a.question is not None or a.questions is not None
    template = a.prompt if a.prompt is not None else VQA_PROMPT
    if asks:
        check_template(template)
    elif a.prompt is not None and "{}" in a.prompt:
        raise ConfigError(f"--prompt {a.prompt!r} is a question template: give --question or --questions with it")
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        print(line, file=sys.stderr)

    todo = jobs(a, note)
    model = load(a.model, device=a.device, dtype=a.dtype)
    if not isinstance(model, Blip2Captioner):
        raise ConfigError(f"{a.model} is a stage-1 export: blip2-generate needs a stage-2 model")
    if a.instruction is not None and not model.instruct:
        raise ConfigError(f"{a.model} is a stage-2 export: --instruction needs an instruction-tuned one "
                          "(InstructBlipForConditionalGeneration); a stage-2 model continues --prompt")
    decoding = dict(VQA_GENERATION if asks else model.instruct_decoding if a.instruction is not None
                    else model.caption_decoding)
    for key in ("num_beams", "max_new_tokens", "min_new_tokens"):
        if getattr(a, key) is not None:
            decoding[key] = getattr(a, key)
    logging.getLogger("blip2-generate").info("%s with decoding %s", "answers" if asks else "captions", decoding)
    caption_prompt = a.instruction if a.instruction is not None else model.prompt if a.prompt is None else a.prompt
    where = "stdout" if a.out == "-" else a.out
    out = sys.stdout if a.out == "-" else open(a.out, "w")
    done, skipped, batch = 0, [], []

    def flush() -> None:
        nonlocal done
        if not batch:
            return
        prompts = [question_prompt(template, q) if q is not None else caption_prompt for _, _, q in batch]
        texts = generate_texts(model.model, model.tokenizer, torch.stack([px for _, px, _ in batch]), prompts,
                               dict(decoding))
        for (name, _, q), prompt, text in zip(batch, prompts, texts):
            rec = {"image": name, "prompt": prompt, "text": text}
            if q is not None:
                rec["question"] = q
            out.write(json.dumps(rec) + "\n")
        out.flush()
        done += len(batch)
        batch.clear()

    try:
        for name, src, q in tqdm(todo, desc="generate", unit="image", file=sys.stderr):
            try:  # each image decoded on its own, before batching: a bad one is skipped, never its batch
                px = model.pixel(src, name)
            except DataError as e:
                tqdm.write(f"skipped {e}", file=sys.stderr)
                skipped.append(name)
                continue
            batch.append((name, px, q))
            if len(batch) == a.batch_size:
                flush()
        flush()
    finally:
        if out is not sys.stdout:
            out.close()
    verb = "answered" if asks else "captioned"
    summary = f"{done} {verb}, {len(skipped)} skipped" + (f": {named(skipped, 5)}" if skipped else "")
    if notes:
        summary += f"; {len(notes)} input(s) with files left out (listed above)"
    print(f"blip2-generate: {summary}; output: {where}", file=sys.stderr)
    if skipped and not done:
        raise DataError(f"none of the {len(skipped)} image(s) could be read (each named above)")
    return EXIT_SKIPPED if skipped else 0


def main(argv: list[str] | None = None) -> int:
    from blip2_train.cli.errors import run_with_one_line_errors
    from blip2_train.cli.log import setup_logging

    a = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    return run_with_one_line_errors(generate, a)


if __name__ == "__main__":
    raise SystemExit(main())
