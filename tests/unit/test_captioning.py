"""Captioning evaluation: our scorer equals pycocoevalcap's scorers run directly; NoCaps domains; the
periodic-evaluation callback logs metrics that ModelCheckpoint can select on."""

from __future__ import annotations

import json

import pytest

from helpers.tiny import tiny_stage2

GTS = {
    "1": ["a red circle in the top left", "the top left shows a red circle"],
    "2": ["a blue square at the bottom right", "there is a blue square in the bottom right corner"],
    "3": ["a green triangle and a yellow circle", "a yellow circle next to a green triangle"],
    "4": ["a purple square", "there is a purple square at the top"],
}
RES = {"1": "a red circle in the top left", "2": "a blue circle at the bottom", "3": "a green triangle",
       "4": "a purple square at the top right"}


def test_scores_equal_pycocoevalcap_run_directly():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from blip2_train.eval.metrics.captioning import score_captions

    ours, notes = score_captions(GTS, RES, spice=False)
    tok = PTBTokenizer()
    g = tok.tokenize({k: [{"caption": c} for c in v] for k, v in GTS.items()})
    r = tok.tokenize({k: [{"caption": v}] for k, v in RES.items()})
    bleu, _ = Bleu(4).compute_score(g, r)
    direct = {"bleu1": bleu[0], "bleu2": bleu[1], "bleu3": bleu[2], "bleu4": bleu[3],
              "meteor": Meteor().compute_score(g, r)[0], "rouge_l": Rouge().compute_score(g, r)[0],
              "cider": Cider().compute_score(g, r)[0]}
    assert set(ours) == set(direct)
    for k, v in direct.items():
        assert ours[k] == pytest.approx(100 * v, rel=1e-9), k
    assert 0 < ours["cider"] < 1000 and ours["bleu1"] > ours["bleu4"]


def test_spice_absence_is_reported_not_silent():
    from blip2_train.eval.metrics.captioning import score_captions, spice_available

    metrics, notes = score_captions(GTS, RES, spice="auto")
    if spice_available():
        assert "spice" in metrics
    else:
        assert "spice" not in metrics and any("SPICE skipped" in n for n in notes)


def test_missing_prediction_is_an_error():
    from blip2_train.eval.metrics.captioning import score_captions

    with pytest.raises(ValueError, match="no prediction"):
        score_captions(GTS, {k: v for k, v in RES.items() if k != "3"}, spice=False)


def nocaps_like(synth, tmp_path):
    """The synthetic test split as a COCO-format caption file with NoCaps-style domains."""
    from blip2_train.data.annotations import read_annotations

    recs = read_annotations(synth["ann"]["test"], "karpathy")[:12]
    domains = ["in-domain", "near-domain", "out-domain"]
    ann = {"images": [{"id": 100 + i, "file_name": r.image, "domain": domains[i % 3]} for i, r in enumerate(recs)],
           "annotations": [{"image_id": 100 + i, "id": j, "caption": c} for i, r in enumerate(recs)
                           for j, c in enumerate(r.captions)]}
    path = tmp_path / "nocaps_val.json"
    path.write_text(json.dumps(ann))
    return path


def test_nocaps_domains_and_prediction_file(tiny_llms, stage1_export, synth, tmp_path):
    from blip2_train.data.datamodule import Blip2DataModule
    from blip2_train.eval.metrics.captioning import score_captions
    from blip2_train.eval.runner import run_evaluation

    model = tiny_stage2(tiny_llms["opt"], stage1_export)
    dm = Blip2DataModule(str(tiny_llms["opt"]), eval_set={"annotation": str(nocaps_like(synth, tmp_path)),
                                                          "image_root": str(synth["root"]), "format": "coco"},
                         eval_batch_size=5, num_workers=0, image_size=32,
                         text={"kind": "llm", "num_query_tokens": 4, "prompt": "a photo of"})
    gen = {"num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 2}
    m = run_evaluation(model, dm, {"kind": "caption", "generate": gen, "spice": False}, out_dir=tmp_path / "out")
    preds = json.loads((tmp_path / "out" / "captions_predictions.json").read_text())
    assert sorted(p["image_id"] for p in preds) == list(range(100, 112))  # ints, each image once
    assert m["num_images"] == 12
    for d in ("in-domain", "near-domain", "out-domain"):
        assert f"{d}/cider" in m
    data = dm.eval_data()
    res = {str(p["image_id"]): p["caption"] for p in preds}
    gts = {i: c for i, c in zip(data.image_ids, data.raw_captions)}
    whole, _ = score_captions(gts, res, spice=False)
    assert m["cider"] == pytest.approx(whole["cider"])
    inn = [i for i, d in zip(data.image_ids, data.domains) if d == "in-domain"]
    sub, _ = score_captions({i: gts[i] for i in inn}, {i: res[i] for i in inn}, spice=False)
    assert m["in-domain/cider"] == pytest.approx(sub["cider"])
    refs = json.loads((tmp_path / "out" / "captions_references.json").read_text())
    assert len(refs["images"]) == 12 and len(refs["annotations"]) == sum(map(len, data.raw_captions))


def test_periodic_evaluation_feeds_checkpoint_selection(tiny_llms, stage1_export, synth, tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from blip2_train.data.datamodule import Blip2DataModule
    from blip2_train.eval.callback import PeriodicEvaluation
    from blip2_train.lit.stage2 import Stage2Module

    model = tiny_stage2(tiny_llms["opt"], stage1_export)
    dm = Blip2DataModule(str(tiny_llms["opt"]), [{"name": "s", "urls": str(synth["train_shards"])}],
                         eval_set={"annotation": str(synth["ann"]["test"]), "image_root": str(synth["root"]), "limit": 6},
                         batch_size=8, num_workers=0, image_size=32, hflip=False, samples_per_epoch=64,
                         max_txt_len=64, text={"kind": "llm", "num_query_tokens": 4, "prompt": "a photo of"})
    ev = PeriodicEvaluation(kind="caption", every_n_steps=2, generate={"num_beams": 1, "max_new_tokens": 5,
                                                                        "min_new_tokens": 1})
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="best-{step}", monitor="val/cider", mode="max",
                           save_top_k=1, every_n_train_steps=2)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[ev, best],
                        enable_progress_bar=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(Stage2Module(model, lr=1e-3, warmup_steps=0, max_steps=4), datamodule=dm)
    assert [h["step"] for h in ev.history] == [2, 4]
    ciders = [h["cider"] for h in ev.history]
    assert best.best_model_score is not None and float(best.best_model_score) == pytest.approx(max(ciders), rel=1e-5)
    assert (tmp_path / "eval" / "step0000002" / "samples.md").read_text().count("|") > 10
    (csv_file,) = tmp_path.glob("lightning_logs/*/metrics.csv")
    assert "val/cider" in csv_file.read_text()
