"""`blip2-classify`: zero-shot classification of image files, folders or WebDataset shards with a stage-1 export.

    blip2-classify --model exports/stage1 --labels dog,cat,bird photos/
    blip2-classify --model exports/stage1 --labels-file classes.txt --template "a photo of a {}." \\
        --template "a blurry photo of a {}." a.jpg b.jpg --itm-topk 3 --out labels.jsonl

Each label fills every --template (default "a photo of a {}."); an image's score for a label is the ITC similarity
(max over the query tokens) with the label's prompt features, averaged over the templates and renormalised
(--ensemble mean, CLIP's prompt ensembling) or with its best prompt (--ensemble max). --itm-topk K re-ranks the K
best labels by the ITM match probability (blip2_train/eval/classify.py). The same code path as `blip2-eval
experiment=classify_zeroshot_eval` and the Python API's `Blip2Scorer.classify`.
--labels-file: one label a line (blank lines and lines starting with # left out).
Folders are read recursively (every file with an extension PIL decodes). Each output line:
{"image", "label": the best label, "top": [{"label", "itc"(, "itm")}, ...] best first}. An image that cannot be read
is skipped: named on stderr, counted in the summary that ends every run.

exit status: 0 every image done; 3 some images skipped, the others done; 2 an error (bad arguments, a missing
input, no image readable): nothing done.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blip2_train.utils.errors import ConfigError, DataError

EXIT_SKIPPED = 3  # some images could not be read (each named on stderr); the others were done


def parse_args(argv):
    p = argparse.ArgumentParser(prog="blip2-classify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files, folders, .tar shards")
    p.add_argument("--model", required=True, help="stage-1 export (Blip2ForImageTextRetrieval directory)")
    p.add_argument("--labels", default=None, help="comma-separated class names: dog,cat,bird")
    p.add_argument("--labels-file", default=None, help="class names, one a line")
    p.add_argument("--template", action="append", default=None,
                   help='prompt template with {} for the label (repeat for an ensemble; default "a photo of a {}.")')
    p.add_argument("--ensemble", default="mean", help="mean (CLIP's: average the prompt features) or max")
    p.add_argument("--topk", type=int, default=5, help="labels listed per image (default 5)")
    p.add_argument("--itm-topk", type=int, default=0, help="re-rank the K best labels with ITM (default 0: off)")
    p.add_argument("--out", default="-", help="JSON lines output file (default: stdout)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def read_labels(a) -> list[str]:
    from blip2_train.eval.classify import check_classes

    if (a.labels is None) == (a.labels_file is None):
        raise ConfigError("give the class names with --labels a,b,c or --labels-file FILE (one of them)")
    if a.labels is not None:
        return check_classes([s.strip() for s in a.labels.split(",") if s.strip()], "--labels")
    path = Path(a.labels_file)
    if not path.is_file():
        raise DataError(f"labels file not found: {path} (--labels-file)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    return check_classes(names, f"--labels-file {path}")


def check_numbers(a) -> None:
    for key, low in (("topk", 1), ("itm_topk", 0), ("batch_size", 1)):
        v = getattr(a, key)
        if v < low:
            raise ConfigError(f"--{key.replace('_', '-')} {v}: must be at least {low}")


def refuse_stage2(path: str) -> None:
    """A stage-2 or InstructBLIP directory is told apart by its config before its LLM is loaded (seconds to
    minutes for a real one) only to be refused."""
    from blip2_train.models.export import export_meta

    p = Path(path)
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return  # not an export at all: load() says so in one line
    arch = (cfg.get("architectures") or [""])[0]
    if export_meta(p).get("stage") in (2, 3) or arch in ("Blip2ForConditionalGeneration",
                                                         "InstructBlipForConditionalGeneration"):
        raise ConfigError(f"{p} is a stage-2 export ({arch or 'an LLM inside'}): blip2-classify needs a stage-1 one "
                          "(Blip2ForImageTextRetrieval: blip2-export of a stage1_pretrain or retrieval_coco_ft run)")


def classify(a) -> int:
    import torch
    from tqdm import tqdm

    from blip2_train.api import Blip2Scorer, load
    from blip2_train.cli.generate import iter_images, named
    from blip2_train.eval.classify import ZeroShotClassifier, check_ensemble, check_templates

    check_numbers(a)
    labels = read_labels(a)
    templates = check_templates(a.template, "--template")
    check_ensemble(a.ensemble, "--ensemble")
    if not a.inputs:
        raise ConfigError("no inputs: give image files, folders or .tar shards")
    notes: list[str] = []

    def note(line: str) -> None:
        notes.append(line)
        print(line, file=sys.stderr)

    todo = list(iter_images(a.inputs, note))
    refuse_stage2(a.model)
    model = load(a.model, device=a.device)
    if not isinstance(model, Blip2Scorer):
        raise ConfigError(f"{a.model} is a stage-2 export: blip2-classify needs a stage-1 one "
                          "(Blip2ForImageTextRetrieval: blip2-export of a stage1_pretrain or retrieval_coco_ft run)")
    head = ZeroShotClassifier(model.model, model.tokenizer, labels, templates, a.ensemble)
    where = "stdout" if a.out == "-" else a.out
    out = sys.stdout if a.out == "-" else open(a.out, "w")
    done, skipped, batch = 0, [], []

    def flush() -> None:
        nonlocal done
        if not batch:
            return
        ranked = head.rank(torch.stack([px for _, px in batch]), a.topk, a.itm_topk)
        for (name, _), top in zip(batch, head.results(ranked)):
            out.write(json.dumps({"image": name, "label": top[0]["label"], "top": top}) + "\n")
        out.flush()
        done += len(batch)
        batch.clear()

    try:
        for name, src in tqdm(todo, desc="classify", unit="image", file=sys.stderr):
            try:  # each image decoded on its own, before batching: a bad one is skipped, never its batch
                px = model.pixel(src, name)
            except DataError as e:
                tqdm.write(f"skipped {e}", file=sys.stderr)
                skipped.append(name)
                continue
            batch.append((name, px))
            if len(batch) == a.batch_size:
                flush()
        flush()
    finally:
        if out is not sys.stdout:
            out.close()
    summary = f"{done} classified, {len(skipped)} skipped" + (f": {named(skipped, 5)}" if skipped else "")
    if notes:
        summary += f"; {len(notes)} input(s) with files left out (listed above)"
    rerank = f", top {min(a.itm_topk, len(labels))} re-ranked by ITM" if a.itm_topk else ""
    print(f"blip2-classify: {summary}; {len(labels)} labels x {len(templates)} template(s) ({a.ensemble}{rerank}); "
          f"output: {where}", file=sys.stderr)
    print("  next: accuracy on a labelled folder: blip2-eval experiment=classify_zeroshot_eval "
          f"paths.stage1_checkpoint={a.model} data.eval_set.image_root=<root>/<class>/<image>", file=sys.stderr)
    if skipped and not done:
        raise DataError(f"none of the {len(skipped)} image(s) could be read (each named above)")
    return EXIT_SKIPPED if skipped else 0


def main(argv: list[str] | None = None) -> int:
    from blip2_train.cli.errors import run_with_one_line_errors
    from blip2_train.cli.log import setup_logging

    a = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    return run_with_one_line_errors(classify, a)


if __name__ == "__main__":
    raise SystemExit(main())
