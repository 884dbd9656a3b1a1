"""Real 2-process DDP on CPU (gloo), run as subprocesses with a clean environment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from blip2_train.models import losses
from helpers.procs import REPO, clean_env
from helpers.tiny import tiny_cli



def test_itc_two_ranks_equals_one_process_over_concatenated_batch(tmp_path):
    out = tmp_path / "res"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                    str(REPO / "tests" / "helpers" / "ddp_itc_worker.py"), str(out)], check=True, cwd=REPO, env=clean_env(),
                   timeout=120, capture_output=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.manual_seed(0)
    img_all = F.normalize(torch.randn(6, 4, 8), dim=-1).requires_grad_(True)
    txt_all = F.normalize(torch.randn(6, 8), dim=-1).requires_grad_(True)
    single = losses.itc_loss(img_all, txt_all, torch.tensor(0.07))
    single.loss.backward()
    # DDP averages over ranks: the mean of per-rank losses is the one-process loss over the whole batch
    mean_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    torch.testing.assert_close(mean_loss, single.loss.detach(), rtol=1e-5, atol=1e-6)
    # gradients flow through the local rows only (the gathered side carries none, as in the reference)
    for r in range(2):
        assert ranks[r]["img_grad"].abs().sum() > 0 and ranks[r]["txt_grad"].abs().sum() > 0
    # positives sit at the rank offset; negatives come from the global batch and are never positives
    for r in range(2):
        pos = ranks[r]["pos"]
        assert pos.shape == (3, 6) and pos[torch.arange(3), r * 3 + torch.arange(3)].all() and pos.sum() == 3
        assert not pos[torch.arange(3), ranks[r]["neg_img"]].any()
    drawn = torch.cat([ranks[r]["neg_img"] for r in range(2)] + [ranks[r]["neg_txt"] for r in range(2)])
    assert drawn.max() < 6


def test_two_process_ddp_fit_through_cli_and_its_resume(synth, tmp_path):
    out = tmp_path / "run"

    def fit(steps, *extra):
        return subprocess.run(
            [sys.executable, "-m", "blip2_train.cli.train", "experiment=stage1_pretrain",
             *tiny_cli(synth, "trainer.devices=2", "strategy=ddp", "+strategy.process_group_backend=gloo",
                       f"trainer.max_steps={steps}", "module.max_steps=6", "data.batch_size=4", "data.num_workers=1",
                       "data.samples_per_epoch=64", "eval.enabled=true", "eval.k_test=4",
                       f"paths.output_dir={out}", *extra)],
            cwd=tmp_path, env=clean_env(), timeout=300, capture_output=True, text=True)

    r = fit(4)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["global_step"] == 4 and "img_r1" in m and "train/loss_itc" in m
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # one directory: no rank chose its own
    # a second launch into the same directory resumes both ranks from last.ckpt (what a requeued job does)
    r = fit(6, "ckpt_path=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stderr and "last.ckpt" in r.stderr
    # mid-epoch (step 4 of 8 per epoch): each rank's loader worker replayed its consumed batches, unread
    assert r.stderr.count("without reading them") == 2, r.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 6
    r = fit(8)  # without ckpt_path the existing checkpoints are protected
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr



@pytest.mark.parametrize("freeze", ["frozen", "unfrozen"])
def test_itm_negatives_across_ranks_same_gradients_and_only_needed_rows_move(synth, tmp_path, freeze):
    """Stage 1 under real DDP (2 gloo processes), ITM negatives on both ranks. The averaged gradient of every
    trainable parameter (ln_vision; the ViT too when unfrozen) equals the gather-all path's (every rank's fp32
    ln_vision output gathered with gradient, its gradient all-reduced), and the loss equals one process over
    the concatenated batch; per rank only the B negative rows of image tokens travel, in the tower's dtype,
    their gradient back only when the tower trains."""
    from helpers.ddp_itm_worker import B, NEG_IMAGE, NEG_TEXT, inputs

    from blip2_train.models.tokenizer import load_qformer_tokenizer
    from helpers.tiny import tiny_stage1

    out = tmp_path / "res"
    port = 29541 if freeze == "frozen" else 29542
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        str(REPO / "tests" / "helpers" / "ddp_itm_worker.py"), str(synth["tokenizer"]), str(out), freeze],
                       cwd=REPO, env=clean_env(), timeout=180, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(f"{out}.{k}") for k in range(2)]

    frozen = freeze == "frozen"
    model = tiny_stage1(synth["tokenizer"], seed=5, freeze_vision=frozen,
                        vision_dtype="bfloat16" if frozen else "float32")
    model.set_train_modes(True)
    parts = [inputs(load_qformer_tokenizer(synth["tokenizer"]), k) for k in range(2)]
    pixels, ids, mask = (torch.cat([p[i] for p in parts]) for i in range(3))
    with torch.no_grad():
        single = model(pixels, ids, mask, neg_idx=(torch.tensor(NEG_IMAGE).flatten(), torch.tensor(NEG_TEXT).flatten()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "hf.vision_model.post_layernorm.weight" in trainable
    assert any(n.startswith("hf.vision_model.encoder") for n in trainable) == (not frozen)
    for k in range(2):
        fetch, gather_all = ranks[k]["fetch"], ranks[k]["gather_all"]
        torch.testing.assert_close((ranks[0]["fetch"]["loss"] + ranks[1]["fetch"]["loss"]) / 2, single.loss,
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fetch["loss"], gather_all["loss"], rtol=0, atol=0)
        assert fetch["grads"].keys() == gather_all["grads"].keys() == trainable
        for n in trainable:
            torch.testing.assert_close(fetch["grads"][n], gather_all["grads"][n], rtol=1e-5, atol=1e-7, msg=n)

    # bytes: the image tokens move as B rows per rank (forward; and their gradient back only when unfrozen)
    vcfg = model.hf.vision_model.config
    fp32_rows = B * ((vcfg.image_size // vcfg.patch_size) ** 2 + 1) * vcfg.hidden_size * 4  # B rows [N, D] fp32
    row_bytes = fp32_rows // 2 if frozen else fp32_rows  # the frozen tower runs in bf16
    for k in range(2):
        fwd, step = ranks[k]["fetch"]["forward_moved"], ranks[k]["fetch"]["moved"]
        assert fwd.get("all_to_all_single") == row_bytes
        assert step.get("all_to_all_single") == row_bytes * (1 if frozen else 2)
        assert step.get("all_reduce", 0) == 0  # no all-reduced [W*B, N, D] gradient
        assert step["all_gather"] < row_bytes  # ITC features, ids, indices: no image tokens gathered
        gather_all = ranks[k]["gather_all"]["moved"]  # W*B rows gathered in fp32 and their gradient all-reduced
        assert gather_all["all_reduce"] == 2 * fp32_rows and gather_all["all_gather"] > 2 * fp32_rows
