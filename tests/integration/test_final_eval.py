"""The end-of-training evaluation (eval.enabled) and the periodic one (callbacks.periodic_eval) at the last step."""

from __future__ import annotations

import json

import pytest

from blip2_train.eval.callback import PeriodicEvaluation
from helpers.tiny import tiny_cli
from helpers.procs import run


def test_final_evaluation_reuses_the_periodic_one_of_the_last_step(synth, tmp_path):
    """When the last step is a periodic-evaluation step with the same protocol, blip2-train does not evaluate the
    same weights a second time: metrics.json carries the periodic result, its files are in the run directory."""
    out = tmp_path / "run"
    r = run("train", ["experiment=stage1_pretrain",
                      *tiny_cli(synth, "trainer.max_steps=4", "module.max_steps=4", "data.batch_size=4",
                                "data.samples_per_epoch=64", "eval.enabled=true", "eval.k_test=4",
                                "callbacks.periodic_eval.every_n_steps=2", f"paths.output_dir={out}")])
    assert r.stderr.count("encodes images") == 2, r.stderr[-3000:]  # steps 2 and 4, not a third time at the end
    assert "final evaluation: the periodic evaluation of step 4 (same protocol), not run again" in r.stderr
    m = json.loads((out / "metrics.json").read_text())
    # val/...: the same figures, logged through a float32 tensor
    assert m["global_step"] == 4 and m["img_r1"] == pytest.approx(m["val/img_r1"], rel=1e-6)
    assert m["txt_r5"] == pytest.approx(m["val/txt_r5"], rel=1e-6) and "itc_only/img_r1" in m


def test_evaluation_protocols_differ_where_results_would():
    same = PeriodicEvaluation.protocol
    caption = {"kind": "caption", "k_test": 16, "generate": {"num_beams": 3}, "image_blind_baseline": True}
    # batching, another kind's settings and the defaults do not change a result
    assert same(caption) == same({**caption, "pair_batch_size": 64, "spice": "auto", "k_test": 8,
                                  "vqa_generate": {"num_beams": 1}})
    for change in ({"generate": {"num_beams": 1}}, {"image_blind_baseline": False}, {"kind": "retrieval"},
                   {"spice": False}):
        assert same(caption) != same({**caption, **change}), change
    vqa = {"kind": "vqa", "vqa_generate": {"num_beams": 5}, "generate": {"num_beams": 3}}
    assert same(vqa) == same({**vqa, "generate": None}) and same(vqa) != same({**vqa, "vqa_generate": {}})
    assert same({"kind": "retrieval", "k_test": 4}) != same({"kind": "retrieval", "k_test": 8})
    # the re-ranking score decides the headline recalls (the default is the reference's)
    assert same({"kind": "retrieval", "k_test": 4}) == same({"kind": "retrieval", "k_test": 4, "rerank_score": "reference"})
    assert same({"kind": "retrieval", "k_test": 4}) != same({"kind": "retrieval", "k_test": 4, "rerank_score": "product"})
    # the periodic evaluation of every experiment runs the final evaluation's protocol (conf/callbacks/default)
    from hydra.utils import instantiate

    from blip2_train.config.compose import compose

    for experiment in ("stage1_pretrain", "stage2_pretrain", "caption_coco_ft", "retrieval_coco_ft"):
        for extra in ([], ["eval.rerank_score=product"]):
            cfg = compose("train", [f"experiment={experiment}", "preset=tiny", *extra])
            assert same(instantiate(cfg.callbacks.periodic_eval).cfg) == same(cfg.eval), (experiment, extra)
