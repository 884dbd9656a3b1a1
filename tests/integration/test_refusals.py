"""Refusals of what a real run meets, through the commands a user types: config values no model can use (NaN or
infinite floats, image sizes the ViT cannot take), a result of one stage given where the other is needed (in both
directions, each told where it goes), and a result made with other tower shapes than the config builds (the demo's
16-query exports under `preset=tiny`, whose towers have 8): one `error:` line naming the key, the value and what
to set, before any work.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import procs
from helpers.procs import one_line, run
from helpers.tiny import tiny_cli

LIMIT = 120  # seconds: a refusal comes before any work


def cli(*args, tool="train"):
    """`blip2-train` / `blip2-eval` (`tool="eval"`) as a subprocess."""
    return procs.cli(*args, tool={"eval": "evaluate"}.get(tool, tool), timeout=LIMIT)


def small_train(synth, out: Path, *extra) -> list[str]:
    return tiny_cli(synth, "data.batch_size=4", "data.samples_per_epoch=40", "eval.enabled=false",
                    "callbacks.periodic_eval.every_n_steps=0", f"paths.output_dir={out}", *extra)


def small_eval(synth, out: Path, *extra) -> list[str]:
    return ["preset=tiny", f"paths.data_dir={synth['dir']}", "data.num_workers=0", "data.eval_set.limit=6",
            "eval.k_test=3", "eval.generate.num_beams=2", "eval.generate.max_new_tokens=6",
            "eval.generate.min_new_tokens=2", f"paths.output_dir={out}", *extra]


@pytest.fixture(scope="module")
def chain16(synth, tiny_llms, tmp_path_factory) -> dict:
    """The demo's chain at its 16 query tokens (run_scripts/demo.sh: arch.num_query_tokens=16): stage 1 ->
    blip2-export -> stage 2 -> blip2-export, each run with preset=tiny, whose towers have 8."""
    root = tmp_path_factory.mktemp("chain16")
    q16 = "arch.num_query_tokens=16"
    run("train", ["experiment=stage1_pretrain", *small_train(synth, root / "s1", "trainer.max_steps=2", q16)])
    run("export", [str(root / "s1" / "checkpoints" / "last.ckpt"), "--out", str(root / "export_s1")])
    run("train", ["experiment=stage2_pretrain", *small_train(synth, root / "s2", "trainer.max_steps=1", q16,
                                                             f"paths.llm_dir={tiny_llms['opt']}",
                                                             f"paths.stage1_checkpoint={root / 'export_s1'}")])
    run("export", [str(root / "s2" / "checkpoints" / "last.ckpt"), "--out", str(root / "export_s2")])
    return {"s1_ckpt": root / "s1" / "checkpoints" / "last.ckpt", "s1": root / "export_s1",
            "s2_ckpt": root / "s2" / "checkpoints" / "last.ckpt", "s2": root / "export_s2"}


# -- config values no model can use ------------------------------------------------------------------------------

@pytest.mark.timeout(LIMIT)
@pytest.mark.parametrize("tool,override,expected", [
    # a range alone lets NaN through (every comparison with it is false); inf used to be caught after 5 steps
    ("train", "module.lr=nan", "module.lr=nan is not a finite number: must be a finite number > 0"),
    ("train", "module.lr=inf", "module.lr=inf is not a finite number: must be a finite number > 0"),
    # floats outside the range table, one inside a list
    ("train", "loss_weights.itm=nan", "loss_weights.itm=nan is not a finite number: must be a finite number"),
    ("train", "module.betas=[0.9,inf]", "module.betas.1=inf is not a finite number"),
    ("eval", "eval.vqa_generate.length_penalty=nan", "eval.vqa_generate.length_penalty=nan is not a finite number"),
])
def test_non_finite_floats_are_one_line_before_any_work(synth, tmp_path, tool, override, expected):
    refused_before_any_work(synth, tmp_path / "run", tool, override, expected,
                            ["experiment=vqa_vqav2_eval", "paths.stage2_checkpoint=null"])


def refused_before_any_work(synth, out: Path, tool: str, override: str, expected: str, eval_start: list[str]):
    """`override` on stage-1 training, or on the evaluation `eval_start` names, is one line naming `expected`,
    and nothing was created."""
    if tool == "train":
        args = ["experiment=stage1_pretrain", *small_train(synth, out, "trainer.max_steps=2", override)]
    else:
        args = [eval_start[0], *small_eval(synth, out, *eval_start[1:], override)]
    line = one_line(cli(*args, tool=tool))
    assert expected in line, line
    assert not out.exists()


@pytest.mark.timeout(LIMIT)
@pytest.mark.parametrize("tool,override,expected", [
    # smaller than one patch: the patch convolution would fail
    ("train", "data.image_size=7", "data.image_size=7 does not fit the ViT's patch size (arch.vision.patch_size=8): "
                                   "must be a multiple of 8"),
    # not a multiple: the last 4 pixels of every row and column would be dropped without a word
    ("train", "data.image_size=12", "must be a multiple of 8, e.g. 8 or 16"),
    ("eval", "data.image_size=20", "data.image_size=20 does not fit the ViT's patch size"),
    ("train", "arch.vision.patch_size=5", "data.image_size=32 does not fit the ViT's patch size "
                                          "(arch.vision.patch_size=5)"),
    # the ViT is built for data.image_size: evaluating at another size is done by building it at that size
    ("train", "data.eval_image_size=48", "data.eval_image_size=48 is not the size the ViT is built for "
                                         "(model.vision.image_size=32)"),
])
def test_image_sizes_the_vit_cannot_take_are_one_line_before_any_work(synth, tmp_path, tool, override, expected):
    refused_before_any_work(synth, tmp_path / "run", tool, override, expected,
                            ["experiment=retrieval_coco_eval", "paths.stage1_checkpoint=null"])


# -- a result of the other stage -----------------------------------------------------------------------------

@pytest.mark.timeout(3 * LIMIT)
@pytest.mark.parametrize("experiment", ["caption_coco_eval", "vqa_vqav2_eval"])
def test_a_stage1_export_given_to_captioning_or_vqa_is_named_before_the_llm(experiment, chain16, synth, tmp_path):
    """The evaluation takes its LLM from the stage-2 checkpoint: a stage-1 export there was reported as an LLM
    whose weights are missing."""
    out = tmp_path / "ev"
    line = one_line(cli(f"experiment={experiment}", *small_eval(synth, out, "arch.num_query_tokens=16",
                                                                f"paths.stage2_checkpoint={chain16['s1']}"),
                        tool="eval"))
    assert f"{chain16['s1']} is a stage-1 export, and the stage-2 checkpoint (paths.stage2_checkpoint) takes a " \
           "stage-2 one" in line, line
    assert "pass it as paths.stage1_checkpoint" in line and "language_model" not in line, line
    assert not out.exists()


@pytest.mark.timeout(3 * LIMIT)
def test_a_stage1_export_given_as_the_llm_is_named(chain16, synth, tmp_path):
    line = one_line(cli("experiment=stage2_pretrain", *small_train(synth, tmp_path / "s2", "arch.num_query_tokens=16",
                                                                   f"paths.stage1_checkpoint={chain16['s1']}",
                                                                   f"paths.llm_dir={chain16['s1']}")))
    assert f"LLM directory {chain16['s1']} is a stage-1 export, which holds no LLM: set paths.llm_dir" in line, line


@pytest.mark.timeout(3 * LIMIT)
def test_a_result_of_the_other_stage_is_told_where_it_goes(chain16, synth, tiny_llms, tmp_path):
    """Each direction names the paths.* key the README teaches for the stage the result is, not the model.* key
    of the stage it was given to."""
    q16 = "arch.num_query_tokens=16"
    # a stage-2 export as a stage-1 model's checkpoint
    line = one_line(cli("experiment=retrieval_coco_eval", *small_eval(synth, tmp_path / "a", q16,
                                                                      f"paths.stage1_checkpoint={chain16['s2']}"),
                        tool="eval"))
    assert f"{chain16['s2']} is a stage-2 export, and paths.stage1_checkpoint takes a stage-1 one" in line, line
    assert "as paths.stage2_checkpoint to evaluate it by captioning or VQA" in line, line
    # blip2-eval checkpoint=<a stage-2 .ckpt> with a retrieval (stage-1) experiment
    line = one_line(cli("experiment=retrieval_coco_eval", *small_eval(synth, tmp_path / "b", q16,
                                                                      "paths.stage1_checkpoint=null",
                                                                      f"checkpoint={chain16['s2_ckpt']}"),
                        tool="eval"))
    assert f"checkpoint={chain16['s2_ckpt']} is a stage-2 checkpoint, and this evaluation (eval.kind=retrieval) " \
           "builds a stage-1 model" in line, line
    assert "paths.stage2_checkpoint" in line and "model.stage1_checkpoint" not in line, line
    # and the other way: a stage-1 .ckpt with a captioning (stage-2) experiment
    line = one_line(cli("experiment=caption_coco_eval", *small_eval(synth, tmp_path / "c", q16,
                                                                    "paths.stage2_checkpoint=null",
                                                                    f"paths.llm_dir={tiny_llms['opt']}",
                                                                    f"checkpoint={chain16['s1_ckpt']}"),
                        tool="eval"))
    assert f"checkpoint={chain16['s1_ckpt']} is a stage-1 checkpoint, and this evaluation (eval.kind=caption) " \
           "builds a stage-2 model: pass it as paths.stage1_checkpoint" in line, line
    assert "model.stage1_checkpoint" not in line, line
    # an evaluation kind of the other stage on the model the experiment builds
    line = one_line(cli("experiment=retrieval_coco_eval", *small_eval(synth, tmp_path / "d", q16, "eval.kind=caption",
                                                                      f"paths.stage1_checkpoint={chain16['s1']}"),
                        tool="eval"))
    assert "eval.kind=caption needs a stage-2 model" in line and "stage 1" in line, line
    assert not any((tmp_path / d).exists() for d in "abcd")


# -- a result made with other tower shapes than the config's ------------------------------------------------------

@pytest.mark.timeout(6 * LIMIT)
def test_the_demos_16_query_exports_under_preset_tiny_name_the_override(chain16, synth, tiny_llms, tmp_path):
    """preset=tiny builds 8 query tokens; the demo's exports have 16. Each command names the override that
    builds the export's shapes, and with it the same command runs (a 32 px export at 48 px included)."""
    want = "add arch.num_query_tokens=16"
    # blip2-eval, retrieval of the stage-1 export
    line = one_line(cli("experiment=retrieval_coco_eval", *small_eval(synth, tmp_path / "r8",
                                                                      f"paths.stage1_checkpoint={chain16['s1']}"),
                        tool="eval"))
    assert f"the stage-1 checkpoint {chain16['s1']} was made with other shapes than this config " \
           f"(arch.num_query_tokens=8): {want}" in line, line
    assert not (tmp_path / "r8").exists()
    run("eval", ["experiment=retrieval_coco_eval", *small_eval(synth, tmp_path / "r16", "arch.num_query_tokens=16",
                                                               "data.image_size=48",
                                                               f"paths.stage1_checkpoint={chain16['s1']}")])
    assert "img_r1" in json.loads((tmp_path / "r16" / "metrics.json").read_text())
    # blip2-eval checkpoint=<the stage-1 run's .ckpt>
    line = one_line(cli("experiment=retrieval_coco_eval", *small_eval(synth, tmp_path / "c8",
                                                                      "paths.stage1_checkpoint=null",
                                                                      f"checkpoint={chain16['s1_ckpt']}"),
                        tool="eval"))
    assert f"(arch.num_query_tokens=8): {want}" in line, line
    # blip2-train, stage 2 from the stage-1 export (the fixture ran it with the override)
    line = one_line(cli("experiment=stage2_pretrain", *small_train(synth, tmp_path / "s2", "trainer.max_steps=1",
                                                                   f"paths.llm_dir={tiny_llms['opt']}",
                                                                   f"paths.stage1_checkpoint={chain16['s1']}")))
    assert f"(arch.num_query_tokens=8): {want}" in line, line
    assert not (tmp_path / "s2").exists()
    # blip2-eval, zero-shot VQA of the stage-2 export
    line = one_line(cli("experiment=vqa_vqav2_eval", *small_eval(synth, tmp_path / "v8",
                                                                 f"paths.stage2_checkpoint={chain16['s2']}"),
                        tool="eval"))
    assert f"the stage-2 checkpoint {chain16['s2']} was made with other shapes than this config " \
           f"(arch.num_query_tokens=8): {want}" in line, line
    run("eval", ["experiment=vqa_vqav2_eval", *small_eval(synth, tmp_path / "v16", "arch.num_query_tokens=16",
                                                          f"paths.stage2_checkpoint={chain16['s2']}")])
    assert "accuracy" in json.loads((tmp_path / "v16" / "metrics.json").read_text())
