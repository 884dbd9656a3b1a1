"""The GPU check's correctness subset (`run_scripts/gpu_check.sh`, step `gpu_tests`): what only a GPU can tell,
run as a user runs it (`blip2-train` / `blip2-eval` subprocesses, `preset=tiny` on the synthetic world).

- bf16-mixed training steps, stage 1 and stage 2 (frozen towers in bf16);
- a Lightning fit and a resume under `strategy=deepspeed_zero2` and `deepspeed_zero3` (Lightning's DeepSpeed
  strategy refuses CPU at fit time: on the CPU dry run these two are skipped, with that reason);
- an FSDP2 fit and a resume on one device;
- a retrieval evaluation on the device with the same metrics as on the CPU.

Marked `gpu`: `make test` deselects them. Without CUDA they FAIL (a GPU check that passes without a GPU is
worse than none), unless GPU_CHECK_DEVICE=cpu runs them on the CPU at tiny size (the dry run in CI).
GPU_CHECK_RECORD=<file.jsonl> collects each test's figures (losses, resume differences, metric differences)
for gpu_check.json.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

from helpers.procs import run

# a hung test fails alone (run_scripts/gpu_check.sh sets a per-test limit inside its step's)
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(int(os.environ.get("GPU_CHECK_TEST_TIMEOUT", "900")))]

DEEPSPEED_NEEDS_CUDA = "Lightning's DeepSpeed strategy needs CUDA (it refuses CPU at fit time): not run on the CPU dry run"


def device() -> str:
    """'cuda', or 'cpu' when GPU_CHECK_DEVICE=cpu; without CUDA otherwise, the calling test fails."""
    want = os.environ.get("GPU_CHECK_DEVICE", "cuda")
    if want == "cpu":
        return "cpu"
    if want != "cuda":
        pytest.fail(f"GPU_CHECK_DEVICE={want!r}: expected 'cuda' (the default) or 'cpu' (the dry run)")
    if not torch.cuda.is_available():
        pytest.fail("no CUDA device: the gpu-marked tests need one (GPU_CHECK_DEVICE=cpu runs them on the CPU, tiny)")
    return "cuda"


def record(test: str, **facts) -> None:
    """Append this test's figures to GPU_CHECK_RECORD (one JSON object a line), if set."""
    path = os.environ.get("GPU_CHECK_RECORD")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": test, "device": os.environ.get("GPU_CHECK_DEVICE", "cuda"), **facts}) + "\n")


def train_args(synth, dev: str, out: Path, *extra) -> list[str]:
    """preset=tiny on the synthetic world, bf16-mixed on one device, 4 steps, checkpoints at steps 2 and 4, a csv
    log of every step, no evaluation (ZeRO-3 / FSDP refuse it during training)."""
    where = ["trainer.accelerator=gpu"] if dev == "cuda" else ["trainer=cpu"]
    return ["preset=tiny", f"paths.data_dir={synth['dir']}", *where, "trainer.devices=1",
            "trainer.precision=bf16-mixed", "logger=csv", "callbacks.progress=null", "data.num_workers=0",
            "data.batch_size=4", "data.samples_per_epoch=64", "trainer.max_steps=4", "module.max_steps=4",
            "module.warmup_steps=1", "trainer.log_every_n_steps=1", "callbacks.model_checkpoint.every_n_train_steps=2",
            "eval.enabled=false", "callbacks.periodic_eval.every_n_steps=0", f"paths.output_dir={out}", *extra]


def stage_args(stage: int, llm: Path) -> list[str]:
    if stage == 1:
        return ["experiment=stage1_pretrain"]
    # the frozen ViT and OPT in bf16 beside fp32 trainable weights, as at real size
    return ["experiment=stage2_pretrain", f"paths.llm_dir={llm}", "paths.stage1_checkpoint=null",
            "arch.frozen_dtype=bfloat16"]


def losses(run_dir: Path) -> dict[int, float]:
    (f,) = run_dir.glob("csv/**/metrics.csv")
    return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f.open()) if r.get("train/loss")}


def fit_and_resume(name: str, synth, llm: Path, dev: str, tmp_path: Path, stage: int, *extra) -> dict:
    """4 steps, then a fresh run resumed from the step-2 checkpoint: it must log steps 2-3 again, with the same
    losses (rel 1e-5 on the CPU; 1e-3 on CUDA, whose bf16 kernels need not be bitwise repeatable)."""
    first = tmp_path / "fit"
    r = run("train", [*stage_args(stage, llm), *train_args(synth, dev, first, *extra)], timeout=600)
    ref = losses(first)
    assert sorted(ref) == [0, 1, 2, 3] and all(math.isfinite(v) for v in ref.values()), ref
    ckpt = first / "checkpoints" / "step0000002.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (first / "checkpoints").iterdir())
    again = tmp_path / "resumed"
    run("train", [*stage_args(stage, llm), *train_args(synth, dev, again, *extra, f"ckpt_path={ckpt}")], timeout=600)
    resumed = losses(again)
    rel = max(abs(resumed[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in (2, 3))
    facts = dict(losses=ref, resumed_losses=resumed, resume_max_rel_diff=rel,
                 checkpoint_entries=sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else None,
                 checkpoint_bytes=sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file()) if ckpt.is_dir()
                 else ckpt.stat().st_size)
    record(name, **facts)
    assert sorted(resumed) == [2, 3], resumed
    assert rel <= (1e-3 if dev == "cuda" else 1e-5), facts
    return {"stderr": r.stderr, **facts}


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_training_steps(stage, synth, tiny_llms, tmp_path):
    """bf16-mixed steps (under DDP, the default strategy, on one device): finite losses at every step, no step
    skipped as non-finite, the frozen towers in bf16 for stage 2."""
    dev = device()
    out = tmp_path / "run"
    run("train", [*stage_args(stage, tiny_llms["opt"]), *train_args(synth, dev, out)], timeout=600)
    got = losses(out)
    m = json.loads((out / "metrics.json").read_text())
    record(f"bf16_stage{stage}", losses=got, global_step=m["global_step"], nonfinite_skipped=m["nonfinite_skipped"])
    assert sorted(got) == [0, 1, 2, 3] and all(math.isfinite(v) for v in got.values()), got
    assert m["global_step"] == 4 and m["nonfinite_skipped"] == 0, m


@pytest.mark.parametrize("zero", [2, 3])
def test_deepspeed_fit_and_resume(zero, synth, tiny_llms, tmp_path):
    """Lightning's Trainer under `strategy=deepspeed_zero{2,3}` end to end on one GPU (stage 2, frozen OPT with a
    tied LM head): fit, checkpoint without frozen weights, resume from step 2."""
    if device() == "cpu":
        record(f"deepspeed_zero{zero}", skipped=DEEPSPEED_NEEDS_CUDA)
        pytest.skip(DEEPSPEED_NEEDS_CUDA)
    fit_and_resume(f"deepspeed_zero{zero}", synth, tiny_llms["opt"], "cuda", tmp_path, 2, f"strategy=deepspeed_zero{zero}")


def test_fsdp2_fit_and_resume_one_device(synth, tiny_llms, tmp_path):
    """`strategy=fsdp` (FSDP2, bf16 all-gathers) on one device: fit, sharded checkpoint, resume from step 2."""
    dev = device()
    r = fit_and_resume("fsdp2_one_device", synth, tiny_llms["opt"], dev, tmp_path, 2, "strategy=fsdp")
    assert "FSDP2: 6 block units + the root, over 1 ranks" in r["stderr"], r["stderr"][-2000:]


def test_retrieval_eval_on_device_equals_cpu(synth, stage1_export, tmp_path):
    """`blip2-eval experiment=retrieval_coco_eval` of one tiny stage-1 export on the device (bf16 autocast there)
    and on the CPU (fp32): the same recalls, up to one item of the test set where bf16 flips a near-tie."""
    dev = device()
    common = ["experiment=retrieval_coco_eval", "preset=tiny", f"paths.data_dir={synth['dir']}", "data.num_workers=0",
              f"paths.stage1_checkpoint={stage1_export}", "paths.bert_dir=???", "eval.k_test=8",
              # the shapes of conftest's tiny export (helpers.tiny.tiny_stage1)
              "arch.vision.hidden_size=32", "arch.vision.intermediate_size=64", "arch.qformer.hidden_size=32",
              "arch.qformer.intermediate_size=64", "arch.num_query_tokens=4", "arch.embed_dim=16"]
    got = {}
    for where in ("cpu", dev) if dev != "cpu" else ("cpu",):
        out = tmp_path / where
        run("eval", [*common, f"device={where}", f"paths.output_dir={out}"], timeout=600)
        got[where] = json.loads((out / "metrics.json").read_text())
    cpu, on_dev = got["cpu"], got[dev]
    keys = sorted(k for k in cpu if k.split("/")[-1].startswith(("txt_r", "img_r")))
    n_img = len(json.loads(Path(synth["ann"]["test"]).read_text()))
    # one item: an image for text->image... R@K over texts, a text for image->text over images; the larger step
    step = 100.0 / n_img
    diffs = {k: abs(on_dev[k] - cpu[k]) for k in keys}
    record("eval_device_vs_cpu", eval_device=dev, max_abs_diff=max(diffs.values()), one_item=step,
           identical=all(v == 0 for v in diffs.values()), cpu={k: cpu[k] for k in keys},
           device_metrics={k: on_dev[k] for k in keys})
    assert keys and all(v <= step + 1e-9 for v in diffs.values()), diffs
