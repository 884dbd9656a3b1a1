"""Host syncs: the counter sees each kind of call that makes the host wait, the Q-Former runs the attention kernel
it is told to with the same result, and a real Lightning training step of each stage syncs only where it must."""

from __future__ import annotations

import pytest
import torch

from helpers.tiny import batch_of, tiny_stage1, tiny_stage2


def test_counter_sees_each_kind_of_sync_and_nothing_else():
    from blip2_train.utils.syncs import count_host_syncs

    x = torch.randn(10, requires_grad=True)
    with count_host_syncs() as quiet:  # all of this stays on the device: no sync
        y = (x * 2).sum()
        x.masked_fill(x > 0, 0)
        torch.where(x > 0, x, 0).nonzero_static(size=3)
        x[torch.tensor([1, 2])]
        y.backward()
        torch.optim.AdamW([x]).step()  # its host-side step count is read, which is no sync on a device
    assert quiet.total == 0, quiet.summary()
    with count_host_syncs() as c:
        y = y.detach()
        y.item()
        bool(y > 0)
        float(y)
        if y:
            pass
        x[x > 0]
        x.detach().nonzero()
        x.tolist()
        x.cpu()
        x.detach().numpy()
        torch.unique(x)
        x.repeat_interleave(torch.ones(10, dtype=torch.long))
    kinds = [what for what, _ in c.events]
    assert kinds == ["_local_scalar_dense"] * 4 + ["index with a boolean mask", "nonzero", "tolist", "cpu", "numpy",
                                                    "_unique2", "repeat_interleave without output_size"], kinds
    assert all(where.startswith("test_syncs.py:") for _, where in c.events), c.events
    assert c.summary().startswith("11 host sync(s)")


def sdpa_calls(fn):
    """How many times `fn` reaches torch's fused attention (F.scaled_dot_product_attention), and its result."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.nn.functional.scaled_dot_product_attention:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        out = fn()
    return Count.n, out


def test_sdpa_qformer_gives_eager_losses_and_gradients(synth, tokenizer):
    """`model.attn_implementation=sdpa` reaches every attention of the Q-Former, self and cross (and the ViT's),
    and the stage-1 step (ITC + ITM + LM, padded captions, fixed negatives) gives eager's losses and gradients."""
    img, ids, mask = batch_of(tokenizer, ["a red circle", "a blue square on the left", "two green triangles"])
    neg = (torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
    runs = {}
    for impl in ("eager", "sdpa"):
        model = tiny_stage1(synth["tokenizer"], attn_implementation=impl)
        model.set_train_modes(True)  # the tiny Q-Former has no dropout: train mode is deterministic
        calls, out = sdpa_calls(lambda: model(img, ids, mask, torch.arange(3), neg_idx=neg))
        out.loss.backward()
        runs[impl] = calls, out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # 2 ViT blocks + Q-Former passes: joint (2 self + 1 cross), text (2 self), ITM (2 self + 1 cross)
    assert runs["eager"][0] == 0 and runs["sdpa"][0] == 2 + 3 + 2 + 3
    (_, e, ge), (_, s, gs) = runs["eager"], runs["sdpa"]
    for k in ("loss", "loss_itc", "loss_itm", "loss_lm"):
        torch.testing.assert_close(getattr(s, k), getattr(e, k), rtol=1e-5, atol=1e-6)
    assert ge.keys() == gs.keys() and len(ge) > 20
    # relative to the gradient's scale: some are zero in exact arithmetic (a key bias shifts every score of a
    # query alike), rounding noise in both runs
    from blip2_train.bench.levers import relative_difference

    assert relative_difference(gs, ge) <= 1e-5
    scale = max(float(g.abs().max()) for g in ge.values())
    for n in ge:
        torch.testing.assert_close(gs[n], ge[n], rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_mask_equals_transformers_own(synth, tokenizer, impl):
    """The text and ITM passes give the Q-Former a ready 4D padding mask (no `mask.all()` sync in transformers);
    the outputs equal those of transformers' own handling of the 2D mask."""
    from blip2_train.utils.syncs import count_host_syncs

    model = tiny_stage1(synth["tokenizer"], attn_implementation=impl).eval()
    img, ids, mask = batch_of(tokenizer, ["a red circle", "a blue square on the left"])
    emb = model.hf.embeddings(input_ids=ids)
    with torch.no_grad():
        theirs = model.qformer(query_embeds=emb, query_length=0, attention_mask=mask).last_hidden_state
        with count_host_syncs() as c:
            ours = model.text_forward(ids, mask)
    assert c.total == 0, c.summary()
    keep = mask.bool()  # padding rows' outputs are never read
    torch.testing.assert_close(ours[keep], theirs[keep], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        image = model.encode_image(img)
        q = model.query_tokens(2)
        joint = model.hf.embeddings(input_ids=ids, query_embeds=q)
        full = torch.cat([torch.ones(2, q.shape[1], dtype=mask.dtype), mask], dim=1)
        h = model.qformer(query_embeds=joint, query_length=q.shape[1], attention_mask=full,
                          encoder_hidden_states=image).last_hidden_state
        theirs_itm = model.hf.itm_head(h[:, : q.shape[1]]).mean(dim=1)
        torch.testing.assert_close(model.itm_forward(image, ids, mask), theirs_itm, rtol=1e-5, atol=1e-6)


def fit_counting_syncs(module, batches):
    import lightning as L

    from blip2_train.bench.levers import HostSyncsPerStep

    counter = HostSyncsPerStep()
    L.Trainer(max_steps=len(batches), accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
              callbacks=[counter]).fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert len(counter.counts) == len(batches)
    return counter.counts


# The syncs a training step may make, by site, at most (one process):
STEP_SYNCS = {
    # the non-finite-loss check: the host decides whether the optimizer step runs (on every rank alike); it
    # reads one flag after the forward
    "blip2_train/lit/base.py": 1,
    # Lightning turns each `prog_bar=True` value (train/loss, train/lr, train/samples_per_s) into a Python number
    # for the bar after every batch. After the optimizer step: the first waits for the step's work, the other two
    # then find the queue empty (they cost a copy, not a wait)
    "lightning/fabric/utilities/apply_func.py": 3,
}


# ... and in stage 2, besides those:
STAGE2_SYNCS = {
    # the LM loss runs the LLM's head at the labelled positions only (the memory of [B, L, V] logits): their
    # count sizes the rows, read once
    "blip2_train/models/losses.py": 1,
    # every row must hold num_query_tokens image tokens, checked on the device batch (a clear error instead of
    # transformers silently mixing samples); it could move to the collator, on the host
    "blip2_train/models/stage2.py": 1,
    # transformers looks into the LLM's 2D attention mask for padding (none: SDPA's is_causal path, no mask)
    "transformers/masking_utils.py": 2,
}


def check_step_syncs(counts, allowed):
    for i, c in enumerate(counts):
        by_file = {}
        for _, where in c.events:
            f = where.split(":", 1)[0]
            by_file[f] = by_file.get(f, 0) + 1
        for f, n in by_file.items():
            assert n <= allowed.get(f, 0), f"batch {i}: {c.summary()}"
    assert max(c.total for c in counts) == sum(allowed.values()), [c.summary() for c in counts]


def test_stage1_training_step_syncs_only_where_it_must(synth, tokenizer):
    """The real `training_step` of stage 1 (Stage1Module, Lightning's loop, AdamW): the model's ITC + ITM + LM
    step (ViT, three Q-Former passes, hard negatives, losses) and backward make no host sync at all."""
    from blip2_train.lit.stage1 import Stage1Module

    batches = []
    for i in range(3):
        img, ids, mask = batch_of(tokenizer, ["a red circle", "a blue square on the left", "two green triangles"],
                                  seed=i)
        batches.append({"image": img, "input_ids": ids, "attention_mask": mask, "image_id": torch.arange(3)})
    module = Stage1Module(tiny_stage1(synth["tokenizer"], attn_implementation="sdpa"), lr=1e-3, warmup_steps=0,
                          max_steps=3)
    check_step_syncs(fit_counting_syncs(module, batches), STEP_SYNCS)


def test_stage2_training_step_syncs_only_where_it_must(tiny_llms):
    """The real `training_step` of stage 2 (OPT): besides those of every step, the image-token check, the loss's
    selection of labelled positions (read once: its backward reads nothing) and transformers' look at the LLM's
    mask."""
    from blip2_train.data.collate import Stage2Collator
    from blip2_train.lit.stage2 import Stage2Module
    from blip2_train.models.llm import load_llm_tokenizer

    model = tiny_stage2(tiny_llms["opt"], attn_implementation="sdpa", llm_attn_implementation="sdpa")
    collate = Stage2Collator(load_llm_tokenizer(tiny_llms["opt"]), model.num_query_tokens, model.image_token_id,
                             model.end_token_id, "a photo of", 32)
    g = torch.Generator().manual_seed(0)
    caps = ["a red circle in the top left", "a green triangle", "the top right shows a yellow circle"]
    batches = [collate([{"image": torch.randn(3, 32, 32, generator=g), "caption": c, "image_id": j}
                        for j, c in enumerate(caps)]) for _ in range(3)]
    counts = fit_counting_syncs(Stage2Module(model, lr=1e-3, warmup_steps=0, max_steps=3), batches)
    check_step_syncs(counts, {**STEP_SYNCS, **STAGE2_SYNCS})
