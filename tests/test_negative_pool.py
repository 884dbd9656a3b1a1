"""model.itm_negative_pool: ITM hard negatives drawn from the batch and a pool of recent samples."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from blip2_train.models import vision
from blip2_train.models.negative_pool import NegativePool
from blip2_train.utils.errors import ConfigError
from conftest import batch_of, tiny_cli, tiny_stage1
from test_ddp import REPO, clean_env

CAPTIONS = ["a red circle", "a blue square at the top", "a green triangle left of a red circle", "a white square"]


def test_pool_keeps_the_last_samples_and_pads_captions_to_the_longest():
    pool = NegativePool(5, pad_token_id=0)

    def push(first, n, width):
        rows = torch.arange(first, first + n)
        pool.push(tokens=rows.float().view(n, 1, 1).expand(n, 3, 2), ids=rows.view(n, 1).expand(n, width) + 1,
                  mask=torch.ones(n, width, dtype=torch.long), image_ids=rows,
                  image_feats=torch.ones(n, 2, 4), text_feat=torch.ones(n, 4))

    push(0, 3, width=2)
    assert len(pool) == 3 and pool.width == 2
    push(3, 4, width=4)  # 7 pushed into 5 slots: the two oldest (0, 1) are overwritten
    view = pool.view()
    assert len(pool) == 5 and sorted(view["image_ids"].tolist()) == [2, 3, 4, 5, 6]
    old = view["image_ids"] == 2  # pushed 2 tokens wide: padded with pad_token_id, masked out
    assert view["ids"][old].tolist() == [[3, 3, 0, 0]] and view["mask"][old].tolist() == [[1, 1, 0, 0]]
    assert (view["tokens"][:, 0, 0] == view["image_ids"].float()).all()  # every field of a slot is one sample
    push(7, 8, width=1)  # a batch larger than the pool: its last 5 samples
    assert sorted(pool.view()["image_ids"].tolist()) == [10, 11, 12, 13, 14]


def test_pool_refuses_non_finite_features():
    """A diverging step (its loss is skipped) must not leave NaN features weighting the draws of later steps."""
    pool = NegativePool(4)
    feats = torch.ones(3, 2, 4)
    feats[1, 0, 0] = float("nan")
    pool.push(torch.zeros(3, 5, 2), torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2, dtype=torch.long),
              torch.tensor([7, 8, 9]), feats, torch.ones(3, 4))
    assert len(pool) == 2 and sorted(pool.view()["image_ids"].tolist()) == [7, 9]


def test_pooled_negatives_are_the_stored_samples_scored_with_the_current_weights(synth, tokenizer):
    model = tiny_stage1(synth["tokenizer"], itm_negative_pool=8)
    model.set_train_modes(True)
    xa, ids_a, mask_a = batch_of(tokenizer, CAPTIONS, seed=1)
    model(xa, ids_a, mask_a, torch.arange(4))  # fills the pool
    assert len(model.negative_pool) == 4
    xb, ids_b, mask_b = batch_of(tokenizer, ["a cyan circle", "two squares", "a red triangle", "a blue circle"], seed=2)
    g = 4  # global batch (one process); the pool's samples follow at g, g + 1, ...
    order = torch.tensor([2, 0, 3, 1])
    out = model(xb, ids_b, mask_b, torch.arange(10, 14), neg_idx=(g + order, g + order.flip(0)))
    with torch.no_grad():
        emb_a = vision.ln_vision(model.vision_model, vision.vision_tokens(model.vision_model, xa, True))
        emb_b = vision.ln_vision(model.vision_model, vision.vision_tokens(model.vision_model, xb, True))
        t = max(ids_a.shape[1], ids_b.shape[1])
        pad = lambda x: torch.nn.functional.pad(x, (0, t - x.shape[1]))  # noqa: E731
        want_neg_image = model.itm_forward(emb_a[order], pad(ids_b), pad(mask_b))
        want_neg_text = model.itm_forward(emb_b, pad(ids_a)[order.flip(0)], pad(mask_a)[order.flip(0)])
    torch.testing.assert_close(out.itm_logits[4:8], want_neg_image, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.itm_logits[8:], want_neg_text, rtol=1e-4, atol=1e-5)
    assert out.pool_negatives == 1.0
    assert len(model.negative_pool) == 8


def test_pool_never_draws_the_same_image_or_an_identical_caption(synth, tokenizer):
    """Pooled samples of a batch image (same image_id, a later epoch) or with its caption text are positives."""
    model = tiny_stage1(synth["tokenizer"], itm_negative_pool=16)
    model.set_train_modes(True)
    x, ids, mask = batch_of(tokenizer, CAPTIONS, seed=1)
    model(x, ids, mask, torch.arange(4))
    # sample 4 of the batch repeats caption 0 on another image (image_id 99)
    x2, ids2, mask2 = batch_of(tokenizer, CAPTIONS + [CAPTIONS[0]], seed=1)
    gen = torch.Generator().manual_seed(0)
    drawn = torch.zeros(5, 5 + 4, dtype=torch.long)
    for _ in range(30):
        out = model(x2, ids2, mask2, torch.tensor([0, 1, 2, 3, 99]), generator=gen)
        model.negative_pool.count = model.negative_pool.next = 4  # the pool: the first batch only
        for idx in out.neg_idx:
            drawn[torch.arange(5), idx] += 1
    pool_part = drawn[:, 5:]  # columns: the pool's samples, image_ids 0..3 with CAPTIONS
    for i in range(4):
        assert pool_part[i, i] == 0  # the same image, pooled
    assert pool_part[4, 0] == 0  # the same caption text as a pooled sample of another image
    assert pool_part.sum() > 0 and drawn[:, :5].sum() > 0  # both the batch and the pool supply negatives


def test_pool_size_is_checked_and_needs_image_ids(synth, tokenizer):
    with pytest.raises(ConfigError, match="model.itm_negative_pool=-1 must be an integer >= 0"):
        tiny_stage1(synth["tokenizer"], itm_negative_pool=-1)
    model = tiny_stage1(synth["tokenizer"], itm_negative_pool=4)
    model.set_train_modes(True)
    with pytest.raises(ValueError, match="needs the batch's image_ids"):
        model(*batch_of(tokenizer, CAPTIONS))


@pytest.mark.parametrize("nproc", [1, 2])
def test_stage1_experiment_with_a_negative_pool_one_and_two_processes(synth, tmp_path, nproc):
    """Through the experiment file and the console script, on 1 process and on 2 launched by torchrun (gloo):
    the pool fills, supplies negatives (logged), and a resume starts from the checkpoint (the pool refills)."""
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "blip2_train.cli.train"]
    extra = []
    if nproc == 2:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
                  "-m", "blip2_train.cli.train"]
        extra = ["trainer.devices=2", "strategy=ddp", "+strategy.process_group_backend=gloo"]

    def fit(steps, *more):
        return subprocess.run(
            [*launch, "experiment=stage1_pretrain",
             *tiny_cli(synth, *extra, "model.itm_negative_pool=12", f"trainer.max_steps={steps}", "module.max_steps=8",
                       "data.batch_size=4", "data.samples_per_epoch=64", "trainer.log_every_n_steps=1",
                       "eval.enabled=false", f"paths.output_dir={out}", *more)],
            cwd=tmp_path, env=clean_env(), timeout=300, capture_output=True, text=True)

    r = fit(6)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    # after 3 steps of 4 the pool is full: at the last step most candidates (12 of 12 + 4 * nproc) are pooled
    assert m["global_step"] == 6 and 0.0 < m["train/itm_pool_negatives"] <= 1.0
    r = fit(8, "ckpt_path=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 8


def test_cli_bad_pool_size_is_one_error_line(synth, tmp_path):
    r = subprocess.run([sys.executable, "-m", "blip2_train.cli.train", "experiment=stage1_pretrain",
                        *tiny_cli(synth, "model.itm_negative_pool=-3", f"paths.output_dir={tmp_path / 'run'}")],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "error: model.itm_negative_pool=-3 must be an integer >= 0 (0: the batch only)")
