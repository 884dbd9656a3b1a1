"""Training on the GPUs people have, run as a user runs it: `blip2-train ... adapter=lora` (LoRA on the LLM, peft)
with and without `model.llm_quant=nf4` (bitsandbytes, whose CPU path is the one tested here), on 1 process and on 2
under torchrun (gloo); `blip2-export` merged and `--adapter-only`, each loaded by plain transformers (+ peft) and
generating the training module's ids; exact resume; the refusals, one line before any work."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from helpers.procs import cli, one_line, run
from helpers.tiny import tiny_cli


def stage2(synth, llm, run_dir, *extra) -> list[str]:
    """Stage 2 of the tiny arch from a random Q-Former (what the LLM side does is what is tested here)."""
    return ["experiment=stage2_pretrain", *tiny_cli(synth, "data.batch_size=4", "data.samples_per_epoch=400",
                                                    "eval.enabled=false"),
            "paths.stage1_checkpoint=null", f"paths.llm_dir={llm}", f"paths.output_dir={run_dir}", *extra]


def losses(run_dir: Path) -> list[float]:
    rows = csv.DictReader(open(run_dir / "csv" / "metrics.csv"))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


LEARN = ["trainer.max_steps=60", "module.warmup_steps=5", "logger=csv", "trainer.log_every_n_steps=5",
         "module.lr=3e-3"]


@pytest.fixture(scope="module")
def runs(synth, tiny_llms, tmp_path_factory) -> dict:
    """Stage 2 on the synthetic world, full (adapter=none) and LoRA, 60 steps each; and LoRA on an NF4 LLM."""
    root = tmp_path_factory.mktemp("low_memory")
    out = {"root": root}
    for name, extra in (("full", ["adapter=none"]), ("lora", ["adapter=lora"]),
                        ("qlora", ["adapter=lora", "model.llm_quant=nf4", "trainer.max_steps=4"])):
        r = run("train", stage2(synth, tiny_llms["opt"], root / name, *LEARN, *extra))
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = root / name
    return out


def test_lora_stage2_learns_as_full_stage2_does(runs):
    full, lora = losses(runs["full"]), losses(runs["lora"])
    assert abs(full[0] - lora[0]) < 0.05  # the same start: LoRA's B is zero, the adapted LLM is the base LLM
    # the tiny LLM is random: through the soft prompt alone the loss falls a little; LoRA also adapts the LLM
    end_full, end_lora = sum(full[-2:]) / 2, sum(lora[-2:]) / 2
    assert end_full < full[0] and end_lora < lora[0] - 0.05, (full, lora)
    assert end_lora < end_full, (full, lora)


def test_checkpoints_hold_the_trainable_weights_only(runs):
    for name in ("lora", "qlora"):
        ckpt = torch.load(runs[name] / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        keys = ckpt["state_dict"]
        llm = [k for k in keys if k.startswith("model.hf.language_model.")]
        assert llm and all(".lora_A." in k or ".lora_B." in k for k in llm), llm[:5]
        assert any(k.startswith("model.hf.qformer.") for k in keys)
        assert ckpt["frozen_weights_omitted"] and ckpt["optimizer_states"]
    log = (runs["qlora"] / "stage2_pretrain.log").read_text()
    assert "uint8" in log  # the parts table: the LLM's adapted projections are held as NF4 integers


@pytest.fixture(scope="module")
def exports(runs) -> dict:
    """`blip2-export` of the LoRA and the QLoRA run, merged and --adapter-only."""
    out = {}
    for name in ("lora", "qlora"):
        ckpt = runs[name] / "checkpoints" / "last.ckpt"
        merged, apart = runs["root"] / f"{name}_merged", runs["root"] / f"{name}_apart"
        for args in ([str(ckpt), "--out", str(merged)], [str(ckpt), "--out", str(apart), "--adapter-only"]):
            r = run("export", args)
            assert r.returncode == 0, r.stderr[-3000:]
        out[name] = (merged, apart)
    return out


def generate_ids(model, processor, images) -> torch.Tensor:
    inputs = processor(images=images, text=[""] * len(images), return_tensors="pt")
    return model.generate(**inputs, num_beams=2, max_new_tokens=6, min_new_tokens=2)


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_exports_merged_and_adapter_only_load_in_plain_transformers(name, runs, exports, synth, tiny_llms):
    """Both exports hold the same model: the LoRA sum formed on the original (unquantised) LLM weights. Without
    quantisation it is the training module's model, so it generates the module's ids; with NF4 the module computed
    with the rounded weights, and the exports differ from it by that rounding only (the loss within 2%)."""
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from blip2_train.models.export import ADAPTER_ONLY_LOADING

    ckpt = runs[name] / "checkpoints" / "last.ckpt"
    merged, apart = exports[name]
    assert not list(merged.glob("llm_adapter")) and (apart / "llm_adapter" / "adapter_config.json").exists()
    meta = json.loads((apart / "blip2_train.json").read_text())["adapter"]
    assert meta["merged"] is False and meta["base"] == str(tiny_llms["opt"]) and meta["r"] == 16
    # the adapter-only export is small: no LLM weights beside the adapter
    assert (apart / "model.safetensors").stat().st_size < (merged / "model.safetensors").stat().st_size

    images = [Image.open(p).convert("RGB") for p in sorted(Path(synth["root"]).rglob("*.jpg"))[:3]]
    processor = Blip2Processor.from_pretrained(str(merged))
    plain = Blip2ForConditionalGeneration.from_pretrained(str(merged)).eval()
    scope = {"export": str(apart), "base_llm": str(tiny_llms["opt"])}
    exec(ADAPTER_ONLY_LOADING.format(cls="Blip2ForConditionalGeneration"), scope)  # the documented recipe
    peft_model = scope["model"].eval()
    ids = generate_ids(plain, processor, images)
    assert torch.equal(ids, generate_ids(peft_model, scope["processor"], images))
    a, b = plain.state_dict(), peft_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the training module itself, rebuilt from the run's config with the checkpoint's weights
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from blip2_train.utils.checkpoints import load_lightning_checkpoint

    cfg = OmegaConf.load(runs[name] / "config.yaml")
    module = instantiate(cfg.model)
    load_lightning_checkpoint(module, ckpt)
    module.eval()
    inputs = processor(images=images, text=[""] * len(images), return_tensors="pt")
    labels = inputs["input_ids"].clone()
    if name == "lora":
        mine = module.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], num_beams=2,
                               max_new_tokens=6, min_new_tokens=2)
        assert torch.equal(mine, ids)
    else:
        cap = processor.tokenizer(["a red circle"] * len(images), add_special_tokens=False, return_tensors="pt")
        full = torch.cat([inputs["input_ids"], cap["input_ids"]], 1)
        mask = torch.ones_like(full)
        labels = full.masked_fill(full == module.image_token_id, -100)
        with torch.no_grad():
            trained = module(inputs["pixel_values"], full, mask, labels).loss
            exported = plain(pixel_values=inputs["pixel_values"], input_ids=full, attention_mask=mask,
                             labels=labels).loss
        assert abs(float(trained) - float(exported)) < 0.02 * float(trained), (trained, exported)


def test_the_api_loads_an_adapter_only_export(exports, synth):
    import blip2_train

    images = [str(p) for p in sorted(Path(synth["root"]).rglob("*.jpg"))[:2]]
    merged, apart = exports["qlora"]
    a = blip2_train.load(merged, device="cpu").caption(images, num_beams=2, max_new_tokens=5)
    assert a == blip2_train.load(apart, device="cpu").caption(images, num_beams=2, max_new_tokens=5)


def test_lora_resumes_exactly(synth, tiny_llms, tmp_path):
    """4 steps straight = 2 steps, then resumed for 2 more: the same adapter and Q-Former weights (the schedule's
    length fixed at 4 in both, as a stopped run's)."""
    base = ["adapter=lora", "model.llm_quant=nf4", "module.warmup_steps=1", "model.text.end_text=null",
            "module.max_steps=4"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for d, steps, resume in ((straight, 4, []), (split, 2, []), (split, 4, ["ckpt_path=auto"])):
        r = run("train", stage2(synth, tiny_llms["llama"], d, *base, f"trainer.max_steps={steps}",
                                "callbacks.model_checkpoint.every_n_train_steps=2", *resume))
        assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(split / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a), \
        [k for k in a if not torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7)][:3]


def test_qlora_instruction_tuning_on_two_processes(synth, tiny_llms, tmp_path, runs):
    """InstructBLIP with an NF4 FlanT5 + LoRA under torchrun: both ranks step together and the export merges."""
    export = runs["root"] / "t5_stage2"
    r = run("train", ["experiment=stage2_pretrain", *tiny_cli(synth, "data.batch_size=4", "data.samples_per_epoch=32",
                                                               "eval.enabled=false", "trainer.max_steps=1"),
                      "model=stage2_flant5", f"paths.llm_dir={tiny_llms['t5']}", "paths.stage1_checkpoint=null",
                      f"paths.output_dir={tmp_path / 's2'}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert run("export", [str(tmp_path / "s2" / "checkpoints" / "last.ckpt"), "--out", str(export)]).returncode == 0
    run_dir = tmp_path / "instruct"
    r = run("train", ["experiment=instruct_tune", *tiny_cli(synth, "data.batch_size=4", "data.samples_per_epoch=32",
                                                             "eval.enabled=false", "trainer.max_steps=2"),
                      "model=instruct_flant5", f"paths.llm_dir={tiny_llms['t5']}",
                      f"paths.stage2_checkpoint={export}", "adapter=lora", "model.llm_quant=nf4",
                      f"paths.output_dir={run_dir}"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 2
    out = tmp_path / "export"
    assert run("export", [str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(out)]).returncode == 0
    from transformers import InstructBlipForConditionalGeneration

    InstructBlipForConditionalGeneration.from_pretrained(str(out))


def test_lora_stage2_on_two_processes(synth, tiny_llms, tmp_path):
    """DDP over the trainable weights only (adapters, Q-Former, projection); the quantised case on 2 processes is
    the instruction-tuning test's."""
    run_dir = tmp_path / "two"
    run("train", stage2(synth, tiny_llms["opt"], run_dir, "adapter=lora", "trainer.max_steps=2",
                        "module.warmup_steps=1"), nproc=2)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["global_step"] == 2 and m["nonfinite_skipped"] == 0
    sd = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(sd[k].abs().max() > 0 for k in sd if ".lora_B." in k)  # the adapters moved


def test_freeze_llm_false_trains_the_whole_llm(synth, tiny_llms, tmp_path):
    r = run("train", stage2(synth, tiny_llms["opt"], tmp_path / "r", "model.freeze_llm=false",
                            "trainer.max_steps=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    keys = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert any(k.startswith("model.hf.language_model.") and "layers.0.fc1" in k for k in keys)


@pytest.mark.parametrize("extra, says", [
    (["experiment=stage1_pretrain", "adapter=lora"], "has no LLM"),
    (["adapter=lora", "model.llm_quant=nf4", "strategy=fsdp"], "use strategy=ddp"),
    (["model.llm_quant=nf4", "model.freeze_llm=false"], "quantised weights cannot train"),
    (["adapter=lora", "adapter.target_modules=[nope]"], "no such module"),
])
def test_refusals_are_one_line_before_any_work(extra, says, synth, tiny_llms, tmp_path):
    args = stage2(synth, tiny_llms["opt"], tmp_path / "r", "trainer.max_steps=1")
    args = [a for a in args if not (a.startswith("experiment=") and extra[0].startswith("experiment="))] + extra
    line = one_line(cli(*args))
    assert says in line, line
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_adapter_only_export_of_a_run_without_adapter_is_one_line(runs):
    line = one_line(cli(str(runs["full"] / "checkpoints" / "last.ckpt"), "--out", str(runs["root"] / "x"),
                        "--adapter-only", tool="export"))
    assert "without an adapter" in line and not (runs["root"] / "x").exists()


def test_an_adapted_run_given_as_a_stage2_source_is_refused_not_dropped(runs, exports, synth, tiny_llms):
    """Its training lives in its LLM, which a stage-2 source does not carry over (model.llm does): a .ckpt, or a
    merged export read with another LLM, would silently continue or score the base LLM."""
    common = ["experiment=caption_coco_ft", *tiny_cli(synth, "trainer.max_steps=1", "eval.enabled=false")]
    line = one_line(cli(*common, f"paths.stage2_checkpoint={runs['lora'] / 'checkpoints' / 'last.ckpt'}",
                        f"paths.llm_dir={tiny_llms['opt']}"))
    assert "holds trained LLM weights" in line and "export it first" in line, line
    merged, apart = exports["lora"]
    line = one_line(cli(*common, f"paths.stage2_checkpoint={merged}", f"paths.llm_dir={tiny_llms['opt']}"))
    assert "leave paths.llm_dir unset" in line, line
    line = one_line(cli(*common, f"paths.stage2_checkpoint={apart}", f"paths.llm_dir={tiny_llms['opt']}"))
    assert "adapter-only export" in line and "adapter=lora" in line, line
