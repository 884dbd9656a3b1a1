"""`blip2-bench`: measured figures, printed and written to docs/benchmarks.md.

    blip2-bench data --shards data/bench/shards --batches 40 --batch-size 32 --image-size 224
    blip2-bench data --photo-like 400 --resume-skip 100 --tokenizer ...   (pip install '.[bench]')
    blip2-bench eval --arch tiny --tokenizer ... --annotation ... --image-root ...
    blip2-bench train --stage 1 --model stage1_vitg --batch-size 100          (GPU)
    blip2-bench train --stage 2 --arch vitg --llm llama-7b --batch-size 16    (GPU; --json out.json keeps the figures)
    blip2-bench train --stage 2 --arch tiny --llm tiny --batch-size 8 (CPU, CI-sized)
    blip2-bench memory lm-loss | itc                                        (peak memory of two hot paths)
    blip2-bench memory --llm /ckpt/vicuna-7b --adapter lora --quant nf4 --batch-size 4   (a run's predicted peak)
    blip2-bench memory --llm llama-7b --adapter lora --quant nf4 --batch-size 2 --measure (+ two real steps)
    blip2-bench memory --table                                              (docs: which LLM fits where)
    blip2-bench levers --size cpu | --size real --device cuda              (eager vs SDPA vs compiled Q-Former)
"""


from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blip2_train.bench.doc import BENCH_DOC, write_section
from blip2_train.utils.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="blip2-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="loader throughput vs plain PIL decode")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="a shard directory, glob or brace pattern")
    src.add_argument("--photo-like", type=int, metavar="N",
                     help="N photo-like 640x480 JPEGs made from scikit-image's photographs (pip install '.[bench]')")
    d.add_argument("--tokenizer", required=True, help="local tokenizer directory")
    d.add_argument("--batches", type=int, default=40)
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best of each is kept")
    d.add_argument("--doc", default=str(BENCH_DOC), help="markdown file to update")
    d.add_argument("--resume-skip", type=int, default=0, metavar="N",
                   help="also time a resume that skips N batches (read, not decoded) against decoding")
    e = sub.add_parser("eval", help="retrieval evaluation: batched protocol vs one-image-at-a-time ITM")
    e.add_argument("--arch", default="tiny", help="a conf/arch/ config (random init unless --checkpoint)")
    e.add_argument("--checkpoint", help="stage-1 export directory or .pth to load")
    e.add_argument("--tokenizer", required=True, help="local BERT tokenizer directory")
    e.add_argument("--annotation", required=True, help="Karpathy-format test annotation")
    e.add_argument("--image-root", required=True)
    e.add_argument("--images", type=int, default=200)
    e.add_argument("--k-test", type=int, default=128)
    e.add_argument("--pair-batch-size", type=int, default=512)
    e.add_argument("--image-size", type=int, default=224)
    e.add_argument("--device", default="auto")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("override", nargs="*", help="extra Hydra overrides (arch.qformer.hidden_size=...)")
    t = sub.add_parser("train", help="training-step throughput, MFU and peak memory (random-init models)")
    t.add_argument("--stage", type=int, choices=[1, 2], required=True)
    t.add_argument("--arch", default="vitg", help="conf/arch config: vitg (the paper) or tiny")
    t.add_argument("--llm", default="opt-2.7b", choices=["opt-2.7b", "opt-6.7b", "llama-7b", "tiny", "tiny-llama"],
                   help="the frozen LLM's shape, built from a config with random weights (no download)")
    t.add_argument("--batch-size", type=int, default=None, help="default: 100 (stage 1) / 64 (stage 2) as the paper")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--image-size", type=int, default=224)
    t.add_argument("--text-len", type=int, default=32)
    t.add_argument("--device", default="auto")
    t.add_argument("--peak-tflops", type=float, default=None)
    t.add_argument("--doc", default=str(BENCH_DOC), help="markdown file to update")
    t.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    lv = sub.add_parser("levers", help="stage-1 step: eager vs SDPA vs SDPA + compiled Q-Former, same result checked")
    lv.add_argument("--size", choices=["cpu", "real", "tiny"], default="cpu",
                    help="cpu: BERT-base Q-Former, small ViT, 2 images; real: the paper's stage 1 (GPU); tiny: CI")
    lv.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best step of each variant is kept")
    lv.add_argument("--steps", type=int, default=1, help="timed steps per variant and round")
    lv.add_argument("--device", default="auto")
    lv.add_argument("--image-size", type=int, default=None)
    lv.add_argument("--doc", default=str(BENCH_DOC), help="markdown file to update")
    lv.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    m = sub.add_parser("memory", help="a stage-2 run's predicted peak memory (--llm, --table); the peak of the "
                       "stage-2 LM loss / retrieval ITC against the naive way (lm-loss, itc)")
    m.add_argument("what", nargs="?", choices=["lm-loss", "itc"])
    m.add_argument("--llm", help="a local LLM directory or a shape preset (opt-2.7b, opt-6.7b, llama-7b, flant5-xl)")
    m.add_argument("--arch", default="vitg", help="conf/arch: the ViT and Q-Former (vitg: the paper's)")
    m.add_argument("--adapter", default="none", choices=["none", "lora"])
    m.add_argument("--quant", default=None, choices=["int8", "nf4"], help="the frozen LLM quantised")
    m.add_argument("--vision-quant", default=None, choices=["int8", "nf4"], help="the frozen ViT quantised")
    m.add_argument("--batch-size", type=int, default=4, help="per GPU")
    m.add_argument("--text-len", type=int, default=32)
    m.add_argument("--image-size", type=int, default=224)
    m.add_argument("--llm-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    m.add_argument("--llm-checkpointing", action="store_true", help="model.activation_checkpointing.llm=true")
    m.add_argument("--measure", action="store_true", help="also run --steps real steps and report their peak")
    m.add_argument("--steps", type=int, default=2)
    m.add_argument("--table", action="store_true", help="the docs' table for OPT-2.7B/6.7B, Vicuna-7B, FlanT5-XL")
    m.add_argument("--json", metavar="PATH", help="also write the prediction (and measurement) to this JSON file")
    m.add_argument("--doc", default=str(BENCH_DOC), help="markdown file to update")
    m.add_argument("--variant", help="run one variant in this process (internal)")
    m.add_argument("--batch", type=int, default=16)
    m.add_argument("--seq", type=int, default=64, help="Q + T positions")
    m.add_argument("--queries", type=int, default=32)
    m.add_argument("--labelled", type=int, default=20, help="caption tokens with a label, per row")
    m.add_argument("--hidden", type=int, default=256)
    m.add_argument("--vocab", type=int, default=50272)
    m.add_argument("--dtype", default="bfloat16", help="the LLM's dtype (its head and hidden states)")
    m.add_argument("--chunk-mib", type=int, default=64)
    m.add_argument("--images", type=int, default=1024)
    m.add_argument("--texts", type=int, default=5000)
    m.add_argument("--dim", type=int, default=256)
    m.add_argument("--block-mib", type=int, default=32, help="stands for 256 at the real size")
    a = p.parse_args(argv)
    if a.command == "memory" and (a.llm or a.table):
        return plan_memory(a, "blip2-bench " + " ".join(sys.argv[1:] if argv is None else argv))
    if a.command == "memory" and not a.what:
        p.error("memory: give lm-loss, itc, --llm or --table")
    if a.command == "memory":
        import json

        from blip2_train.bench import memory

        if a.variant:
            print(json.dumps({"peak_mib": memory.variant_peak(a)}))
        else:
            args = list(sys.argv[1:] if argv is None else argv)[1:]
            print(json.dumps(memory.run(a, args)))
        return 0
    if a.command == "data":
        from blip2_train.bench.data import bench_data

        try:
            bench_data(a)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if a.command == "eval":
        from blip2_train.bench.eval import bench_eval

        bench_eval(a)
        return 0
    if a.command == "train":
        import json

        from blip2_train.bench.train import markdown, run

        model = a.arch
        bs = a.batch_size or (100 if a.stage == 1 else 64)
        r = run(a.stage, model, bs, a.steps, a.warmup, a.image_size, a.llm, a.text_len, a.device, a.peak_tflops)
        text = markdown(r, "blip2-bench " + " ".join(sys.argv[1:] if argv is None else argv))
        print(text)
        print(json.dumps(r, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps({"command": "blip2-bench " + " ".join(sys.argv[1:] if argv is None
                                                                                     else argv), **r}, indent=1))
        write_section(f"train-stage{a.stage}-{model}-{r['device'].split(':')[0]}" + (f"-{a.llm}" if a.stage == 2 else ""),
                      text, Path(a.doc))
        return 0
    if a.command == "levers":
        from blip2_train.bench import levers

        return levers.main(a, "blip2-bench " + " ".join(sys.argv[1:] if argv is None else argv))
    return 2


def plan_memory(a, command: str) -> int:
    from blip2_train.bench import plan

    if a.table:
        text = "\n".join(["## Memory plan: which LLM fits which GPU", "", f"Command: `{command}`  ",
                          "Predicted peak of a stage-2 / instruction-tuning step (ViT-g frozen in bf16, BERT-base "
                          "Q-Former, 32 queries + 32 text tokens, AdamW); a batch fits a card when the prediction + 15% + "
                          "1.5 GiB of CUDA context and allocator slack stays within 93% of it (bench/plan.py fits).", "", plan.table()])
        print(text)
        write_section("memory-plan", text, Path(a.doc))
        return 0
    try:
        kw = dict(arch=a.arch, adapter=a.adapter, quant=a.quant, vision_quant=a.vision_quant, batch_size=a.batch_size,
                  text_len=a.text_len, llm_dtype=a.llm_dtype, image_size=a.image_size)
        pred = plan.predict(a.llm, llm_checkpointing=a.llm_checkpointing, **kw)
        measured = plan.measure(a.llm, vision_dtype="bfloat16", steps=a.steps, **kw) if a.measure else None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = plan.markdown(pred, command, measured)
    print(text)
    if a.json:
        import json

        Path(a.json).write_text(json.dumps({"command": command, "predicted": pred, "measured": measured}, indent=1))
    if measured:
        what = f"{Path(a.llm).name} {a.adapter} {a.quant or a.llm_dtype} batch {a.batch_size}"
        write_section("memory-measured-" + what.replace(" ", "-"),
                      f"## Memory: predicted and measured, {what} ({measured['device']})\n\n" + text, Path(a.doc))
    print(f"\npredicted peak {pred['total'] / plan.GIB:.2f} GiB" +
          (f", measured {measured['peak_bytes'] / plan.GIB:.2f} GiB" if measured else "") +
          "; next: blip2-train ... adapter=lora model.llm_quant=nf4 (docs/scaling.md)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
