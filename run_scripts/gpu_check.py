"""The GPU check's steps and its report (run by run_scripts/gpu_check.sh; read that first). Standard library only
at import: `done` and `report` must work whatever failed before them.

    gpu_check.py env --json F                 # GPU, driver, torch, CUDA, the version of every package used
    gpu_check.py eval-bench --work W --json F --device D --images N ...   # blip2-bench eval on a COCO-shaped set
    gpu_check.py done --work W --name S --rc RC --seconds T --limit L     # a step's outcome
    gpu_check.py report --work W --out OUT    # OUT/gpu_check.json + OUT/gpu_check.md from what the steps left
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# name -> what it measures, in the order the script runs them (the most valuable figures first)
STEPS = {
    "install": "the kit installed offline (pip --no-index --find-links .gpu-kit)",
    "env": "GPU, driver, torch, CUDA, versions of every package used",
    "bench_stage1": "blip2-bench train, stage 1: ViT-g frozen + BERT-base Q-Former, 224 px, batch 100, bf16",
    "bench_stage2_opt": "blip2-bench train, stage 2 with an OPT-2.7B-shaped LLM, batch 64, bf16",
    "bench_stage2_llama7b": "blip2-bench train, stage 2 with a LLaMA-7B-shaped LLM, batch 16: peak memory, step time",
    "qlora_7b": "blip2-bench memory --measure: QLoRA stage 2 (NF4 LLaMA-7B-shaped LLM + LoRA), batch 8: peak memory "
                "against the prediction, step time",
    "gpu_tests": "pytest -m gpu tests/gpu: bf16 steps, DeepSpeed ZeRO-2/3 and FSDP2 fit + resume, eval = CPU",
    "eval_bench": "blip2-bench eval at COCO-5k shape (364 px, k_test 128) beside the one-image-at-a-time baseline",
    "levers": "blip2-bench levers: eager vs SDPA vs SDPA + compiled Q-Former, same result checked",
}
# every distribution the check imports (directly or through the package), for the environment step
PACKAGES = ["torch", "lightning", "pytorch-lightning", "lightning-utilities", "transformers", "tokenizers",
            "safetensors", "huggingface-hub", "torchmetrics", "hydra-core", "omegaconf", "antlr4-python3-runtime",
            "webdataset", "braceexpand", "deepspeed", "pydantic", "pydantic-core", "hjson", "msgpack", "ninja",
            "py-cpuinfo", "einops", "numpy", "pillow", "pyyaml", "packaging", "psutil", "tqdm", "typing-extensions",
            "pytest", "pytest-timeout", "pytest-xdist", "pluggy", "triton", "blip2-train", "wandb", "pycocoevalcap",
            "peft", "bitsandbytes", "accelerate"]
COCO_5K = 5000


def sh(*cmd: str) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def attempt(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a figure that cannot be read is reported, not fatal
        return f"unavailable: {type(e).__name__}: {e}"


def env_step(out: Path) -> int:
    import importlib
    import importlib.metadata as md

    sys.path.insert(0, str(REPO / "run_scripts"))
    import gpu_kit

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    imports = {}
    for mod in ("torch", "lightning", "transformers", "hydra", "omegaconf", "webdataset", "deepspeed",
                "torchmetrics", "blip2_train", "blip2_train.cli.train", "blip2_train.cli.bench"):
        try:
            m = importlib.import_module(mod)
            imports[mod] = getattr(m, "__file__", None) or "ok"
        except Exception as e:  # noqa: BLE001 - every failure is a figure here
            imports[mod] = f"FAILED: {type(e).__name__}: {e}"
    import torch

    cuda = torch.cuda.is_available()
    gpu = {}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        gpu = {"peak_bf16_tflops_assumed": attempt(lambda: __import__("blip2_train.bench.train", fromlist=["x"])
                                                   .peak_flops(torch.device("cuda"), None)[1]),"name": p.name, "count": torch.cuda.device_count(), "memory_gib": round(p.total_memory / 2**30, 1),
               "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
               "bf16": torch.cuda.is_bf16_supported()}
    smi = sh("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")
    figures = {
        "device_mode": os.environ.get("GPU_CHECK_DEVICE", "cuda"),
        "gpu": gpu, "nvidia_smi": smi, "driver": smi.split(",")[1].strip() if smi and "," in smi else None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": attempt(torch.backends.cudnn.version) if cuda else None,
        "nccl": attempt(lambda: ".".join(map(str, torch.cuda.nccl.version()))) if cuda else None, "cuda_available": cuda,
        "python": f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "nvcc": sh("nvcc", "--version"),
        "versions": versions, "imports": imports,
        # the tree that runs (python -m from the repository root) against the tree the kit's wheel was built from
        "source_hash": gpu_kit.source_hash(),
    }
    manifest = REPO / ".gpu-kit" / "manifest.json"
    if manifest.exists():
        kit = json.loads(manifest.read_text())
        figures["kit"] = {"built": kit.get("built"), "bytes": kit.get("total_bytes"),
                          "wheel_matches_tree": kit.get("source_hash") == figures["source_hash"]}
    out.write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))
    failed = [k for k, v in imports.items() if str(v).startswith("FAILED")]
    want_cuda = figures["device_mode"] != "cpu"
    if failed or (want_cuda and not cuda):
        print(f"environment incomplete: imports failed {failed}, CUDA {'available' if cuda else 'NOT available'}",
              file=sys.stderr)
        return 1
    return 0


def make_eval_set(root: Path, n: int, px: int, seed: int = 0) -> tuple[Path, Path, Path]:
    """A COCO-Karpathy-test-shaped retrieval set: n JPEGs (rectangles of random colours), 5 captions each of 8-14
    words of a BERT-base-sized vocabulary, a tokenizer of that size. -> (annotation, image root, tokenizer)."""
    import random

    from PIL import Image, ImageDraw

    from blip2_train.bench.train import synthetic_bert_tokenizer

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img = Image.new("RGB", (px, px), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.randrange(px), rng.randrange(px)
            d.rectangle([x0, y0, x0 + rng.randrange(px // 2) + 1, y0 + rng.randrange(px // 2) + 1],
                        fill=tuple(rng.randrange(256) for _ in range(3)))
        img.save(root / "images" / f"{i:06d}.jpg", quality=85)
        caps = [" ".join(f"w{rng.randrange(30000)}" for _ in range(rng.randint(8, 14))) for _ in range(5)]
        records.append({"image": f"images/{i:06d}.jpg", "caption": caps, "image_id": f"{i:06d}"})
    ann = root / "test.json"
    ann.write_text(json.dumps(records))
    return ann, root, synthetic_bert_tokenizer(root / "tokenizer")


def parse_eval_table(text: str) -> dict:
    """The two protocol rows and the verdict that `blip2-bench eval` prints."""
    out = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith(("reference:", "blip2-train:")):
            key = "baseline" if cells[0].startswith("reference:") else "batched"
            out[key] = {"protocol": cells[0], "seconds": float(cells[1]), "txt_r1": float(cells[2]),
                        "img_r1": float(cells[3]), "r_mean": float(cells[4])}
    m = re.search(r"Speed-up ([\d.]+)x; metrics (\w+)", text)
    if m:
        out["speedup"], out["metrics_identical"] = float(m.group(1)), m.group(2) == "identical"
    return out


def eval_step(a) -> int:
    """`blip2-bench eval` (its own code, in this process) on a synthetic COCO-shaped slice. On CUDA both protocols
    run under one bf16 autocast: the batched one sets its own, the baseline (bench/retrieval_baseline.py) sets
    none and would otherwise re-rank in fp32, an unequal race."""
    import torch

    from blip2_train.cli.bench import main as bench_main

    work = Path(a.work).resolve()
    t0 = time.perf_counter()
    ann, root, tok = make_eval_set(work / "eval_data", a.images, a.source_px)
    data_seconds = time.perf_counter() - t0
    argv = ["eval", "--arch", a.arch, "--tokenizer", str(tok), "--annotation", str(ann), "--image-root", str(root),
            "--images", str(a.images), "--k-test", str(a.k_test), "--image-size", str(a.image_size),
            "--device", a.device]
    cwd = work / "eval_cwd"  # blip2-bench eval writes docs/benchmarks.md where it runs: not into the tree
    cwd.mkdir(parents=True, exist_ok=True)
    here = os.getcwd()
    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            sys.__stdout__.write(s)
            buf.write(s)
            return len(s)

    differ = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if a.device == "cuda" else contextlib.nullcontext()
    os.chdir(cwd)
    try:
        with autocast, contextlib.redirect_stdout(Tee()):
            bench_main(argv)
    except SystemExit as e:  # the two protocols' metrics differ: the figures are kept, the step fails
        differ = str(e)
    finally:
        os.chdir(here)
    figures = {"command": "blip2-bench " + " ".join(argv), "images": a.images, "texts": 5 * a.images,
               "k_test": a.k_test, "image_size": a.image_size, "arch": a.arch, "device": a.device,
               "autocast": "bf16 around both protocols" if a.device == "cuda" else "none (fp32)",
               "data_seconds": round(data_seconds, 1), **parse_eval_table(buf.getvalue())}
    if differ:
        figures["metrics_differ"] = differ
    if a.images < COCO_5K:
        figures["extrapolation"] = (
            f"a {a.images}-image slice of the COCO 5k shape; the 5k figures are x{COCO_5K / a.images:g}: at fixed k_test "
            "every part grows linearly with the images (5 captions each: image and text encoding, 2 x k_test "
            "candidates per image and per caption, the ITM pairs), except the ITC matrix (n^2, 2 TFLOP at 5k: "
            "under a second on this GPU)")
        for k in ("baseline", "batched"):
            if k in figures:
                figures[k]["seconds_at_5k_extrapolated"] = round(figures[k]["seconds"] * COCO_5K / a.images, 1)
    Path(a.json).write_text(json.dumps(figures, indent=1))
    return 1 if differ or "batched" not in figures else 0


def done(a) -> int:
    """Record a step's outcome: status from its exit code (124/137: its time limit), its log's tail."""
    work = Path(a.work)
    log = work / f"{a.name}.log"
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    if a.skipped:
        status, reason = "skipped", a.skipped
    elif a.rc == 0:
        status, reason = "passed", None
    elif a.rc in (124, 137):
        status, reason = "timeout", f"stopped at its {a.limit} s limit"
    else:
        status, reason = "failed", f"exit status {a.rc}"
    (work / f"{a.name}.step.json").write_text(json.dumps(
        {"status": status, "reason": reason, "rc": a.rc, "seconds": round(a.seconds, 1), "limit_s": a.limit,
         "command": a.command, "log_tail": tail}, indent=1))
    return 0


def junit(path: Path) -> list[dict]:
    import xml.etree.ElementTree as ET

    if not path.exists():
        return []
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        res = {"name": case.get("name"), "seconds": round(float(case.get("time") or 0), 1), "status": "passed",
               "reason": None}
        for tag, status in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            el = case.find(tag)
            if el is not None:
                res["status"] = status
                res["reason"] = (el.get("message") or (el.text or "")).strip()[:1500]
                break
        out.append(res)
    return out


def gpu_tests_figures(work: Path) -> dict:
    tests = junit(work / "gpu_tests.xml")
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    records = []
    rec = work / "gpu_tests_records.jsonl"
    if rec.exists():
        records = [json.loads(line) for line in rec.read_text().splitlines() if line.strip()]
    return {"counts": counts, "tests": tests, "records": records,
            "skipped_not_passed": [f"{t['name']}: {t['reason']}" for t in tests if t["status"] == "skipped"]}


def fmt_bench(f: dict) -> str:
    mem = f"{f['peak_memory_gib']:.1f} GiB peak ({f['memory_kind']})"
    return (f"{f['samples_per_s']:.1f} images/s, MFU {100 * f['mfu']:.1f}% ({f['achieved_tflops']:.1f} TFLOP/s of "
            f"{f['peak']}), step {1000 * f['step_seconds']:.0f} ms, {mem}; {f['device_name']}, batch {f['batch_size']}, "
            f"{f['image_size']} px, {f['params']['frozen'] / 1e9:.2f} B frozen + {f['params']['trainable'] / 1e6:.0f} M "
            "trained parameters")


def summary(name: str, step: dict) -> str:
    f = step.get("figures") or {}
    if name == "env" and f:
        g = f.get("gpu") or {}
        return (f"{g.get('name', 'no GPU')} ({g.get('memory_gib', '-')} GiB), driver {f.get('driver')}, torch "
                f"{f.get('torch')}, CUDA {f.get('cuda')}, {f.get('python')}")
    if name.startswith("bench_") and f.get("samples_per_s"):
        return fmt_bench(f)
    if name == "gpu_tests" and f.get("tests"):
        c = f["counts"]
        parts = [f"{c.get(k, 0)} {k}" for k in ("passed", "failed", "error", "skipped") if c.get(k)]
        bad = [f"{t['name']}: {t['status']}" for t in f["tests"] if t["status"] in ("failed", "error")]
        skip = [f"{t['name']} skipped ({t['reason']})" for t in f["tests"] if t["status"] == "skipped"]
        return "; ".join([", ".join(parts)] + bad + skip)
    if name == "eval_bench" and f.get("batched"):
        b, r = f["batched"], f.get("baseline", {})
        text = (f"{f['images']} images x {f['texts']} texts, k_test {f['k_test']}, {f['image_size']} px: batched "
                f"{b['seconds']:.1f} s vs one-image-at-a-time {r.get('seconds', float('nan')):.1f} s "
                f"(x{f.get('speedup', float('nan')):.1f}), metrics {'identical' if f.get('metrics_identical') else 'DIFFERENT'}")
        if "seconds_at_5k_extrapolated" in b:
            text += (f"; COCO 5k extrapolated: {b['seconds_at_5k_extrapolated']:.0f} s vs "
                     f"{r.get('seconds_at_5k_extrapolated', float('nan')):.0f} s")
        return text
    if name == "install" and f:
        return f"{f.get('method')} ({f.get('python')})"
    return step.get("reason") or ""


def report(a) -> int:
    """OUT/gpu_check.json and OUT/gpu_check.md from what the steps left in WORK; run after every step, so a
    check stopped half-way still leaves its earlier figures."""
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = {}
    for name, what in STEPS.items():
        p = work / f"{name}.step.json"
        step = json.loads(p.read_text()) if p.exists() else {"status": "not run", "reason": "the check stopped before it"}
        step["what"] = what
        fig = work / f"{name}.json"
        if fig.exists():
            try:
                step["figures"] = json.loads(fig.read_text())
            except json.JSONDecodeError:
                step["figures"] = None
        if name == "gpu_tests" and p.exists():
            step["figures"] = gpu_tests_figures(work)
        steps[name] = step
    meta = json.loads((work / "meta.json").read_text()) if (work / "meta.json").exists() else {}
    # skipped steps: the install under GPU_CHECK_SKIP_INSTALL=1, or one the budget left no time for (not a pass)
    bad = [n for n, s in steps.items() if s["status"] in ("failed", "timeout", "not run")
           or (s["status"] == "skipped" and "budget" in (s.get("reason") or ""))]
    doc = {"schema": 1, **meta, "overall": "failed" if bad else "passed", "not_passed": bad, "updated": time.strftime("%Y-%m-%d %H:%M:%S %z"),
           "seconds_so_far": round(sum(s.get("seconds", 0) for s in steps.values()), 1), "steps": steps}
    tmp = out / ".gpu_check.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out / "gpu_check.json")
    lines = [f"# GPU check ({meta.get('device_mode', '?')})", "",
             f"{meta.get('started', '')}; budget {meta.get('budget_s', '?')} s; {doc['seconds_so_far']} s of steps so far; "
             f"overall: {doc['overall']}" + (f" ({', '.join(bad)})" if bad else "") + ".",
             "", "| step | status | seconds | figures |", "| --- | --- | ---: | --- |"]
    for name, s in steps.items():
        cell = summary(name, s).replace("|", "/").replace("\n", " ")
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {cell} |")
    lines += ["", "Each step's command, figures and log tail: gpu_check.json; every step's log: gpu_check.log."]
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env")
    e.add_argument("--json", required=True)
    v = sub.add_parser("eval-bench")
    v.add_argument("--work", required=True)
    v.add_argument("--json", required=True)
    v.add_argument("--device", default="cuda")
    v.add_argument("--arch", default="vitg")
    v.add_argument("--images", type=int, default=1000)
    v.add_argument("--k-test", type=int, default=128)
    v.add_argument("--image-size", type=int, default=364)
    v.add_argument("--source-px", type=int, default=384, help="side of the synthetic JPEGs")
    d = sub.add_parser("done")
    d.add_argument("--work", required=True)
    d.add_argument("--name", required=True, choices=list(STEPS))
    d.add_argument("--rc", type=int, default=0)
    d.add_argument("--seconds", type=float, default=0.0)
    d.add_argument("--limit", type=int, default=0)
    d.add_argument("--command", default="")
    d.add_argument("--skipped", default=None, help="the reason the step was not run")
    r = sub.add_parser("report")
    r.add_argument("--work", required=True)
    r.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "env":
        return env_step(Path(a.json))
    if a.cmd == "eval-bench":
        return eval_step(a)
    if a.cmd == "done":
        return done(a)
    return report(a)


if __name__ == "__main__":
    raise SystemExit(main())
