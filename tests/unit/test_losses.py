"""Each stage-1 loss against a direct computation from its definition, on the same tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip2_train.models import losses
from helpers.tiny import batch_of

CAPS = ["a red circle in the top left", "a blue square at the bottom right",
        "there is a green triangle at the top right", "a yellow circle in the bottom left and a red square in the top right"]


def manual_itc(img, txt, temp, pos, eps=0.1):
    """Loops, no einsum: sim[i, j] = max_q <img[i, q], txt[j]> / temp; smoothed multi-positive targets."""
    b, g = img.shape[0], txt.shape[0]
    sim = torch.zeros(b, g)
    for i in range(b):
        for j in range(g):
            sim[i, j] = max(float(img[i, q] @ txt[j]) for q in range(img.shape[1])) / temp
    total = 0.0
    sim_t2i = torch.zeros(b, g)
    for j in range(b):
        for i in range(g):
            sim_t2i[j, i] = max(float(img[i, q] @ txt[j]) for q in range(img.shape[1])) / temp
    for s in (sim, sim_t2i):
        for r in range(b):
            logp = s[r] - torch.logsumexp(s[r], 0)
            npos = pos[r].sum()
            for c in range(g):
                target = (1 - eps) * (pos[r, c] / npos) + eps / g
                total -= float(target * logp[c]) / b
    return total / 2


def test_itc_matches_definition_one_positive():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(5, 3, 8), dim=-1)
    txt = F.normalize(torch.randn(5, 8), dim=-1)
    res = losses.itc_loss(img, txt, torch.tensor(0.07))
    assert res.loss.item() == pytest.approx(manual_itc(img, txt, 0.07, torch.eye(5)), rel=1e-5)
    # one positive per row == torch's cross-entropy with label smoothing 0.1, as the reference computes it
    ce = (F.cross_entropy(res.sim_i2t, torch.arange(5), label_smoothing=0.1)
          + F.cross_entropy(res.sim_t2i, torch.arange(5), label_smoothing=0.1)) / 2
    assert res.loss.item() == pytest.approx(ce.item(), rel=1e-6)


def test_itc_multi_positive_with_image_ids():
    torch.manual_seed(1)
    img = F.normalize(torch.randn(4, 2, 6), dim=-1)
    txt = F.normalize(torch.randn(4, 6), dim=-1)
    ids = torch.tensor([7, 3, 7, 9])
    res = losses.itc_loss(img, txt, torch.tensor(0.1), image_ids=ids)
    pos = (ids[:, None] == ids[None, :]).float()
    assert res.pos_mask.float().equal(pos)
    assert res.loss.item() == pytest.approx(manual_itc(img, txt, 0.1, pos), rel=1e-5)


def test_hard_negatives_never_pick_positives_and_follow_similarity():
    sim = torch.tensor([[5.0, 4.0, -3.0, -3.0], [0.0, 5.0, 3.0, -9.0], [1.0, 1.0, 5.0, 1.0], [0.0, 0.0, 0.0, 5.0]])
    pos = torch.eye(4, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    for _ in range(300):
        neg_img, neg_txt = losses.sample_hard_negatives(sim, sim, pos, g)
        counts[torch.arange(4), neg_img] += 1
        assert not pos[torch.arange(4), neg_img].any() and not pos[torch.arange(4), neg_txt].any()
    assert counts[0, 1] > 250  # the hardest negative dominates (softmax of similarities)
    assert counts[1, 2] > 250


def test_itc_identical_captions_are_extra_positives():
    """false_negatives=caption: identical caption texts of different images are positives of each other."""
    torch.manual_seed(3)
    img = F.normalize(torch.randn(4, 2, 6), dim=-1)
    txt = F.normalize(torch.randn(4, 6), dim=-1)
    ids = torch.tensor([[5, 8, 9, 0], [5, 7, 0, 0], [5, 8, 9, 0], [5, 8, 9, 4]])  # captions 0 and 2 are equal
    same = losses.same_text_mask(ids, ids)
    assert same.equal(torch.eye(4, dtype=torch.bool) | torch.tensor([[0, 0, 1, 0], [0] * 4, [1, 0, 0, 0], [0] * 4]).bool())
    image_ids = torch.tensor([10, 11, 12, 13])
    res = losses.itc_loss(img, txt, torch.tensor(0.1), image_ids=image_ids, extra_pos=same)
    assert res.pos_mask.equal(same)
    assert res.loss.item() == pytest.approx(manual_itc(img, txt, 0.1, same.float()), rel=1e-5)
    ref = losses.itc_loss(img, txt, torch.tensor(0.1), image_ids=image_ids)
    assert ref.loss.item() == pytest.approx(manual_itc(img, txt, 0.1, torch.eye(4)), rel=1e-5)
    assert abs(ref.loss.item() - res.loss.item()) > 1e-3


@pytest.mark.parametrize("mode", ["reference", "caption"])
def test_model_never_draws_an_identical_caption_as_itm_negative(tokenizer, synth, mode):
    """Two images with the same caption text and different image_ids: with false_negatives=caption the model
    never samples one as the other's hard negative; the reference's rule (image_id only) does."""
    from helpers.tiny import tiny_stage1

    model = tiny_stage1(synth["tokenizer"], false_negatives=mode)
    model.eval()
    caps = [CAPS[0], CAPS[1], CAPS[0]]
    x, ids, mask = batch_of(tokenizer, caps)
    x[2] = x[0]  # the same picture twice: the hardest possible negative if it were one
    g = torch.Generator().manual_seed(0)
    drawn = torch.zeros(3, 3)
    with torch.no_grad():
        for _ in range(40):
            out = model(x, ids, mask, image_ids=torch.tensor([1, 2, 3]), generator=g)
            drawn[torch.arange(3), out.neg_idx[0]] += 1
            drawn[torch.arange(3), out.neg_idx[1]] += 1
    assert out.pos_mask[0, 2].item() == out.pos_mask[2, 0].item() == (mode == "caption")
    if mode == "caption":
        assert drawn[0, 2] == drawn[2, 0] == 0 and drawn[0, 1] == drawn[2, 1] == 80  # only image/text 1 is left
    else:
        assert drawn[0, 2] > 0 and drawn[2, 0] > 0


def test_unknown_false_negatives_mode_is_one_config_line(synth):
    from blip2_train.utils.errors import ConfigError
    from helpers.tiny import tiny_stage1

    with pytest.raises(ConfigError, match=r"model.false_negatives='image' is not one of \['reference', 'caption'\]"):
        tiny_stage1(synth["tokenizer"], false_negatives="image")


def test_itm_loss_labels_and_value():
    logits = torch.randn(9, 2)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert losses.itm_labels(3).equal(labels)
    manual = -sum(torch.log_softmax(logits[i], 0)[labels[i]] for i in range(9)) / 9
    assert losses.itm_loss(logits).item() == pytest.approx(manual.item(), rel=1e-6)


def test_lm_loss_shift_smoothing_and_padding():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 11)
    ids = torch.tensor([[9, 4, 5, 6, 3], [9, 7, 3, 0, 0]])
    labels = losses.lm_labels(ids, pad_token_id=0)
    eps, total, n = 0.1, 0.0, 0
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            logp = torch.log_softmax(logits[b, t], 0)
            total += -((1 - eps) * logp[y] + eps * logp.mean()).item()
            n += 1
    assert losses.lm_loss(logits, labels).item() == pytest.approx(total / n, rel=1e-5)


def test_lm_mask_structure():
    m = losses.lm_attention_mask(2, torch.tensor([[1, 1, 0]]), torch.float32)
    allowed = (m[0, 0] == 0).int()
    expected = torch.tensor([
        [1, 1, 0, 0, 0],  # queries see queries only
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # text: all queries + causal text
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],  # padding column never visible
    ])
    assert allowed.equal(expected)
    assert m.min().item() == torch.finfo(torch.float32).min  # additive, not boolean


def test_joint_pass_query_rows_equal_query_only_pass(tiny_model, tokenizer):
    x, ids, mask = batch_of(tokenizer, CAPS)
    tiny_model.eval()
    with torch.no_grad():
        ie = tiny_model.encode_image(x)
        q_only = tiny_model.image_query_forward(ie)
        dec = ids.clone()
        dec[:, 0] = tokenizer.bos_token_id
        q_joint, logits = tiny_model.joint_lm_forward(ie, dec, mask)
    torch.testing.assert_close(q_joint, q_only, atol=1e-5, rtol=1e-5)
    assert logits.shape == (4, ids.shape[1], len(tokenizer))
    # text logits do not depend on later text (causal): change the last real token of row 0
    dec2 = dec.clone()
    last = int(mask[0].sum()) - 1
    dec2[0, last] = 5
    with torch.no_grad():
        _, logits2 = tiny_model.joint_lm_forward(ie, dec2, mask)
    torch.testing.assert_close(logits2[0, :last], logits[0, :last])


def test_forward_matches_composition_with_fixed_negatives(tiny_model, tokenizer):
    """The model's total loss == the three loss functions applied to the model's own sub-passes by hand."""
    x, ids, mask = batch_of(tokenizer, CAPS)
    tiny_model.eval()
    tiny_model.false_negatives = "reference"  # LAVIS's positives: the parity setting
    neg = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))
    with torch.no_grad():
        out = tiny_model(x, ids, mask, neg_idx=neg)
        ie = tiny_model.encode_image(x)
        img = tiny_model.image_feats(tiny_model.image_query_forward(ie))
        txt = tiny_model.text_feat(tiny_model.text_forward(ids, mask))
        itc = losses.itc_loss(img, txt, tiny_model.temp)
        pair_logits = []
        for k in range(4):  # positive pairs, then (text k, negative image), then (image k, negative text)
            pair_logits.append(tiny_model.itm_forward(ie[k : k + 1], ids[k : k + 1], mask[k : k + 1]))
        for k in range(4):
            pair_logits.append(tiny_model.itm_forward(ie[neg[0][k]][None], ids[k : k + 1], mask[k : k + 1]))
        for k in range(4):
            pair_logits.append(tiny_model.itm_forward(ie[k : k + 1], ids[neg[1][k]][None], mask[neg[1][k]][None]))
        itm = losses.itm_loss(torch.cat(pair_logits))
        dec = ids.clone()
        dec[:, 0] = tokenizer.bos_token_id
        _, logits = tiny_model.joint_lm_forward(ie, dec, mask)
        lm = losses.lm_loss(logits, losses.lm_labels(dec, tokenizer.pad_token_id))
    assert out.loss_itc.item() == pytest.approx(itc.loss.item(), rel=1e-5)
    assert out.loss_itm.item() == pytest.approx(itm.item(), rel=1e-4)
    assert out.loss_lm.item() == pytest.approx(lm.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((itc.loss + itm + lm).item(), rel=1e-5)


def test_gradients_reach_trainables_not_frozen_vit(tiny_model, tokenizer):
    x, ids, mask = batch_of(tokenizer, CAPS)
    tiny_model.set_train_modes(True)
    assert not tiny_model.vision_model.encoder.training and tiny_model.qformer.training
    tiny_model(x, ids, mask).loss.backward()
    assert tiny_model.temp.grad is not None and tiny_model.temp.grad.abs() > 0
    assert tiny_model.hf.query_tokens.grad.abs().sum() > 0
    assert tiny_model.vision_model.post_layernorm.weight.grad.abs().sum() > 0  # ln_vision trains
    for n, p in tiny_model.vision_model.named_parameters():
        if not n.startswith("post_layernorm"):
            assert not p.requires_grad and p.grad is None, n
    # tied LM head: one tensor
    assert tiny_model.lm_head.predictions.decoder.weight is tiny_model.hf.embeddings.word_embeddings.weight


def test_temperature_is_clamped(tiny_model):
    with torch.no_grad():
        tiny_model.temp.fill_(5.0)
    assert tiny_model.clamped_temp().item() == pytest.approx(0.5)
    with torch.no_grad():
        tiny_model.temp.fill_(-1.0)
    assert tiny_model.clamped_temp().item() == pytest.approx(0.001)
    assert math.isfinite(tiny_model.temp.item())


def test_lm_loss_from_hidden_equals_lm_loss_over_full_logits():
    """Chunked, labelled rows only, with label smoothing too; a batch without any label is NaN in both."""
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(3, 7, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[:, :3] = -100
    labels[1, 5:] = -100
    for smoothing in (0.0, 0.1):
        ref = losses.lm_loss(head(hidden), labels, smoothing)
        (g_ref,) = torch.autograd.grad(ref, hidden)
        ours = losses.lm_loss_from_hidden(hidden, labels, head, 11, chunk_bytes=4 * 11 * 2, label_smoothing=smoothing)
        (g_ours,) = torch.autograd.grad(ours, hidden)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-6, atol=1e-7)
    none = torch.full_like(labels, -100)
    assert losses.lm_loss(head(hidden), none, 0.0).isnan() and losses.lm_loss_from_hidden(hidden, none, head, 11).isnan()


def test_cli_unknown_false_negatives_mode_is_one_error_line(synth, tmp_path, capsys):
    """model.false_negatives travels from the command line to the model: a wrong value is one line, exit 2
    (blip2-train's entry point, called in this process)."""
    from blip2_train.cli.train import main
    from helpers.tiny import tiny_cli

    rc = main(["experiment=stage1_pretrain", *tiny_cli(synth, "model.false_negatives=image",
                                                        f"paths.output_dir={tmp_path / 'run'}")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.strip().splitlines()[-1] == "error: model.false_negatives='image' is not one of ['reference', 'caption']"


def test_loss_weights_scale_the_summed_loss_and_its_gradient(tokenizer, synth):
    """model.loss_weights: the total is the weighted sum of the three losses (the logged parts stay unweighted),
    and a weight of 0 takes that loss's gradient out (here ITC's: its projections get none)."""
    from helpers.tiny import tiny_stage1

    x, ids, mask = batch_of(tokenizer, CAPS)
    neg = (torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2]))
    plain = tiny_stage1(synth["tokenizer"], seed=5)
    weighted = tiny_stage1(synth["tokenizer"], seed=5, loss_weights={"itc": 0.0, "itm": 2.0})
    a, b = plain(x, ids, mask, neg_idx=neg), weighted(x, ids, mask, neg_idx=neg)
    assert b.loss_itc.item() == pytest.approx(a.loss_itc.item()) and b.loss_itm.item() == pytest.approx(a.loss_itm.item())
    assert b.loss.item() == pytest.approx(2 * a.loss_itm.item() + a.loss_lm.item(), rel=1e-5)
    b.loss.backward()
    assert weighted.hf.vision_projection.weight.grad.abs().max() == 0  # ITC alone reaches the projections
    assert weighted.hf.itm_head.weight.grad.abs().max() > 0


@pytest.mark.parametrize("weights, message", [({"itx": 1.0}, "loss_weights.itx: no such stage-1 loss"),
                                              ({"itc": -1}, "loss_weights.itc=-1 must be a number >= 0")])
def test_bad_loss_weights_are_one_config_line(synth, weights, message):
    from helpers.tiny import tiny_stage1

    from blip2_train.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_stage1(synth["tokenizer"], loss_weights=weights)


def test_cli_loss_weights_travel_from_their_group_and_a_bad_one_is_one_line(synth, tmp_path, capsys):
    """conf/loss_weights is the one owner (`reference` by default, `tiny` selectable); a negative weight given on
    the command line is one error line, exit 2, before training (blip2-train's entry point, in this process)."""
    from blip2_train.config.compose import compose
    from blip2_train.cli.train import main
    from helpers.tiny import tiny_cli

    assert dict(compose("train", ["experiment=stage1_pretrain"]).model.loss_weights) == {"itc": 1.0, "itm": 1.0,
                                                                                          "lm": 1.0}
    cfg = compose("train", ["experiment=retrieval_coco_ft", "preset=tiny", "loss_weights=tiny", "loss_weights.lm=0.5"])
    assert dict(cfg.model.loss_weights) == {"itc": 0.1, "itm": 1.0, "lm": 0.5}
    rc = main(["experiment=stage1_pretrain", *tiny_cli(synth, "loss_weights.itc=-1",
                                                        f"paths.output_dir={tmp_path / 'run'}")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.strip().splitlines()[-1] == "error: loss_weights.itc=-1 must be a number >= 0"
    assert not (tmp_path / "run" / "checkpoints").exists()
