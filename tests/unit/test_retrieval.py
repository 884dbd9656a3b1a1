"""The fast retrieval protocol equals the literal reference protocol, on random data and a tiny model."""

from __future__ import annotations

import random

import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate

from blip2_train.data.eval_sets import CaptionedImages
from blip2_train.eval.metrics import retrieval
from blip2_train.eval.retrieval import evaluate_retrieval


def random_case(n_img, caps_per_img, seed):
    rng = random.Random(seed)
    txt2img, img2txt = [], []
    for i in range(n_img):
        img2txt.append([])
        for _ in range(rng.randint(1, caps_per_img)):
            img2txt[i].append(len(txt2img))
            txt2img.append(i)
    g = torch.Generator().manual_seed(seed)
    sim = torch.randn(n_img, len(txt2img), generator=g)
    itm = torch.randn(n_img, len(txt2img), generator=g) * 3
    return sim, itm, txt2img, img2txt


@pytest.mark.parametrize("seed,k,itc_temp", [(0, 3, 1.0), (1, 8, 1.0), (2, 100, 1.0), (3, 8, 0.07), (4, 100, 0.05)])
def test_fast_protocol_equals_naive(seed, k, itc_temp):
    sim, itm, txt2img, img2txt = random_case(17, 5, seed)
    calls = []

    def score_pairs(pairs):
        calls.append(pairs.shape[0])
        return itm[pairs[:, 0], pairs[:, 1]]

    i2t, t2i = retrieval.rerank(sim, k, score_pairs, itc_temp)
    fast = retrieval.ranks_from_candidates(i2t, t2i, txt2img, img2txt, sim)
    dense = retrieval.naive_protocol(sim, k, lambda i, j: float(itm[i, j]), itc_temp)
    naive = retrieval.ranks_from_dense(*dense, txt2img, img2txt)
    assert torch.equal(fast[0], naive[0]) and torch.equal(fast[1], naive[1])
    assert retrieval.recall_metrics(*fast) == retrieval.recall_metrics(*naive)
    assert len(calls) == 1  # one batched call; each pair at most once
    assert calls[0] <= min(k, sim.shape[1]) * sim.shape[0] + min(k, sim.shape[0]) * sim.shape[1]


def test_itc_alone_breaks_ties_as_the_reranked_ranks_do():
    """Repeated captions give exact ITC ties (another image's identical caption). ITC alone must rank them by the
    rule the re-ranked ranks use (the smaller index first): counting a tie a hit for ITC alone only charged
    re-ranking for every duplicate caption. Equal to the dense stable argsort, and to re-ranking every column
    with an ITM that adds nothing."""
    sim, itm, txt2img, img2txt = random_case(20, 4, 5)
    sim = sim.round(decimals=0)  # many exact ties: within rows, within columns
    for i in range(0, 20, 2):  # image i+1's first caption is image i's first caption, again
        sim[:, img2txt[i + 1][0]] = sim[:, img2txt[i][0]]
    fast = retrieval.itc_ranks(sim, txt2img, img2txt)
    dense = retrieval.ranks_from_dense(sim, sim.t(), txt2img, img2txt)
    assert torch.equal(fast[0], dense[0]) and torch.equal(fast[1], dense[1])
    # every column a candidate and an ITM that adds nothing: the re-ranked ranks are ITC's, ties included
    i2t, t2i = retrieval.rerank(sim, len(txt2img), lambda p: torch.zeros(p.shape[0]))
    reranked = retrieval.ranks_from_candidates(i2t, t2i, txt2img, img2txt, sim)
    assert torch.equal(reranked[0], fast[0]) and torch.equal(reranked[1], fast[1])
    strict = (sim > sim[torch.tensor(txt2img), torch.arange(len(txt2img))][None]).sum(0)  # ties counted hits
    assert (strict < fast[1]).any()  # the case has ties that the rule decides
    # ... and under the product score (an ITM that adds nothing: log p = log 1/2 everywhere; cosine / 0.07)
    both = retrieval.rerank_all(sim, len(txt2img), lambda p: torch.zeros(p.shape[0], 2), 0.07)
    for rule, (i2t, t2i) in both.items():
        reranked = retrieval.ranks_from_candidates(i2t, t2i, txt2img, img2txt, sim)
        assert torch.equal(reranked[0], fast[0]) and torch.equal(reranked[1], fast[1]), rule


def test_product_score_with_exact_ties_equals_naive():
    """Repeated captions and coarse scores: exact ties among the candidates' product scores (the same ITM logit
    and cosine), broken by the smaller index in the fast path as in the dense stable sort. Every column is a
    candidate: the naive protocol picks its candidates by torch.topk, whose order among ties at the k-th is not
    the fast path's rule (test_candidates_tied_at_the_kth_are_the_smaller_columns tests that one)."""
    sim, itm, txt2img, img2txt = random_case(20, 4, 6)
    sim, itm = sim.round(decimals=1), itm.round(decimals=0)
    for i in range(0, 20, 2):  # image i+1's first caption is image i's first caption, again
        sim[:, img2txt[i + 1][0]] = sim[:, img2txt[i][0]]
        itm[:, img2txt[i + 1][0]] = itm[:, img2txt[i][0]]
    logp = torch.stack([-itm, itm], dim=-1).log_softmax(-1)[..., 1]
    for k in (100,):
        i2t, t2i = retrieval.rerank(sim, k, lambda p: logp[p[:, 0], p[:, 1]], 0.07)
        fast = retrieval.ranks_from_candidates(i2t, t2i, txt2img, img2txt, sim)
        naive = retrieval.ranks_from_dense(*retrieval.naive_protocol(sim, k, lambda i, j: float(logp[i, j]), 0.07),
                                           txt2img, img2txt)
        assert torch.equal(fast[0], naive[0]) and torch.equal(fast[1], naive[1]), k
        assert (i2t.score[:, :, None] == i2t.score[:, None, :]).sum() > i2t.score.numel()  # ties exist


def test_evaluation_runs_without_autograd(synth, tiny_model, tokenizer, monkeypatch):
    """Every forward of the retrieval evaluation runs under no_grad (also inside training, where autograd is on):
    a graph kept per ITM batch would hold the activations of every candidate pair (COCO 5k: millions)."""
    from blip2_train.data.eval_sets import EvalImageDataset, collate_eval_images
    from torch.utils.data import DataLoader

    data = CaptionedImages.from_karpathy(synth["ann"]["test"], synth["root"])
    loader = DataLoader(EvalImageDataset(data, 32), batch_size=8, collate_fn=collate_eval_images)
    seen = []
    for name in ("itm_forward", "retrieval_image_embeds", "retrieval_text_feat"):
        fn = getattr(tiny_model, name)
        monkeypatch.setattr(tiny_model, name, lambda *a, _f=fn, **k: (seen.append(torch.is_grad_enabled()), _f(*a, **k))[1])
    with torch.enable_grad():
        evaluate_retrieval(tiny_model, data, loader, tokenizer, (0, len(data)), k_test=3)
    assert seen and not any(seen)


def test_product_score_needs_a_learnt_temperature(synth, stage1_export, tmp_path, tokenizer, caplog):
    """A stage-1 checkpoint without `temp` (what transformers' Blip2ForImageTextRetrieval saves): the product score
    is refused by name before any work, the reference's is reported without rerank_product/*; once training
    steps, the temperature is the run's own."""
    import shutil

    from blip2_train.data.eval_sets import EvalImageDataset, collate_eval_images
    from blip2_train.utils.errors import ConfigError
    from helpers.tiny import batch_of, tiny_stage1
    from torch.utils.data import DataLoader

    plain = tmp_path / "plain_transformers"
    shutil.copytree(stage1_export, plain)
    (plain / "blip2_train_extras.safetensors").unlink()
    model = tiny_stage1(synth["tokenizer"], stage1_checkpoint=str(plain))
    data = CaptionedImages.from_karpathy(synth["ann"]["test"], synth["root"])
    loader = DataLoader(EvalImageDataset(data, 32), batch_size=8, collate_fn=collate_eval_images)
    with pytest.raises(ConfigError, match="eval.rerank_score=product .*plain_transformers holds no ITC temperature"):
        evaluate_retrieval(model, data, loader, tokenizer, (0, len(data)), k_test=3, rerank_score="product")
    with caplog.at_level("WARNING"):
        m = evaluate_retrieval(model, data, loader, tokenizer, (0, len(data)), k_test=3)
    assert "rerank_product/* not computed" in caplog.text and "txt_r1" in m and "rerank_reference/txt_r1" in m
    assert not any(k.startswith("rerank_product/") for k in m)
    model.train()
    model(*batch_of(tokenizer, ["a red circle", "a blue square"]))  # a training forward
    assert "rerank_product/txt_r1" in evaluate_retrieval(model, data, loader, tokenizer, (0, len(data)), k_test=3,
                                                         rerank_score="product")


def test_recall_beyond_k_test_comes_from_itc_order():
    """A target outside the k_test candidates is ranked by ITC after them, not given rank k: with k_test=1 (the
    candidate is ITC's top-1 anyway) every R@K equals the ITC ranking's, and R@5 is not inflated to 100."""
    sim, itm, txt2img, img2txt = random_case(30, 5, 11)
    i2t, t2i = retrieval.rerank(sim, 1, lambda p: itm[p[:, 0], p[:, 1]])
    m = retrieval.recall_metrics(*retrieval.ranks_from_candidates(i2t, t2i, txt2img, img2txt, sim))
    itc_only = retrieval.recall_metrics(*retrieval.ranks_from_dense(sim, sim.t(), txt2img, img2txt))
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert m[key] == pytest.approx(itc_only[key]), key
    assert m["txt_r5"] < 100.0 and m["img_r5"] < 100.0 and m["img_r10"] < 100.0


def test_recall_matches_torchmetrics_hit_rate():
    sim, itm, txt2img, img2txt = random_case(12, 5, 7)
    k_test = 1000  # re-rank everything: final scores = itm + sim everywhere
    i2t, t2i = retrieval.rerank(sim, k_test, lambda p: itm[p[:, 0], p[:, 1]])
    ranks = retrieval.ranks_from_candidates(i2t, t2i, txt2img, img2txt, sim)
    m = retrieval.recall_metrics(*ranks)
    score = sim + itm
    for k in (1, 5, 10):
        hit = RetrievalHitRate(top_k=k)
        target = torch.zeros_like(score, dtype=torch.bool)
        for i, ts in enumerate(img2txt):
            target[i, ts] = True
        idx = torch.arange(score.shape[0]).unsqueeze(1).expand_as(score)
        assert m[f"txt_r{k}"] == pytest.approx(100 * hit(score.flatten(), target.flatten(), indexes=idx.flatten()).item())
        hit_t = RetrievalHitRate(top_k=k)
        target_t = target.t().contiguous()
        idx_t = torch.arange(score.shape[1]).unsqueeze(1).expand_as(score.t())
        assert m[f"img_r{k}"] == pytest.approx(100 * hit_t(score.t().flatten(), target_t.flatten(), indexes=idx_t.flatten()).item())


def test_score_rules_from_one_itm_call():
    """`rerank_all` scores every rule from one batched ITM call, each as `rerank` scores it alone; "product" is
    log p_ITM(match) + ITC / temperature, and it ranks differently from the reference's sum."""
    sim, itm, txt2img, img2txt = random_case(25, 4, 9)
    logits = torch.stack([-itm, itm], dim=-1) / 2  # [I, T, 2]: log-odds itm
    calls = []

    def pair_logits(pairs):
        calls.append(pairs.shape[0])
        return logits[pairs[:, 0], pairs[:, 1]]

    temp = 0.07
    both = retrieval.rerank_all(sim, 6, pair_logits, temp)
    assert len(calls) == 1 and set(both) == set(retrieval.RERANK_SCORES)
    ranks = {}
    for rule, (i2t, t2i) in both.items():
        ranks[rule] = retrieval.ranks_from_candidates(i2t, t2i, txt2img, img2txt, sim)
        itm_term = logits[..., 1] if rule == "reference" else logits.log_softmax(-1)[..., 1]
        alone = retrieval.rerank(sim, 6, lambda p, t=itm_term: t[p[:, 0], p[:, 1]],
                                 1.0 if rule == "reference" else temp)
        expect = retrieval.ranks_from_candidates(*alone, txt2img, img2txt, sim)
        assert torch.equal(ranks[rule][0], expect[0]) and torch.equal(ranks[rule][1], expect[1]), rule
    assert not torch.equal(ranks["reference"][1], ranks["product"][1])  # the rule matters on this case
    with pytest.raises(ValueError, match="temperature"):
        retrieval.rerank_all(sim, 6, pair_logits, None)
    with pytest.raises(ValueError, match="unknown rerank score"):
        retrieval.rerank_terms(logits[0], "sum", temp)


def test_config_choices_are_the_codes_own():
    """utils.config_ranges refuses what the code that reads the setting would refuse, no more, no less."""
    from blip2_train.eval.runner import EVAL_KINDS
    from blip2_train.config.ranges import CHOICES

    for root in ("eval", "callbacks.periodic_eval"):
        assert CHOICES[f"{root}.rerank_score"] == retrieval.RERANK_SCORES
        assert CHOICES[f"{root}.kind"] == EVAL_KINDS


@pytest.mark.parametrize("rule", ["reference", "product"])
def test_tiny_model_eval_equals_naive_protocol(synth, tiny_model, tokenizer, rule):
    from blip2_train.data.eval_sets import EvalImageDataset, collate_eval_images
    from torch.utils.data import DataLoader

    data = CaptionedImages.from_karpathy(synth["ann"]["test"], synth["root"])
    loader = DataLoader(EvalImageDataset(data, 32), batch_size=8, collate_fn=collate_eval_images)
    k = 5
    m = evaluate_retrieval(tiny_model, data, loader, tokenizer, (0, len(data)), k_test=k, pair_batch_size=7,
                           rerank_score=rule)
    temp = float(tiny_model.temp.detach())
    assert m["itc_temp"] == pytest.approx(temp)
    # naive: features again, ITM one pair at a time
    tiny_model.eval()
    tok = tokenizer(data.texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        # the same image batches as the fast path: beyond k_test the order is ITC's, down to its last bit
        ie, feats = (torch.cat(x) for x in zip(*(tiny_model.retrieval_image_embeds(b) for b, _ in loader)))
        txt = tiny_model.retrieval_text_feat(tok["input_ids"], tok["attention_mask"])
        sim = retrieval.itc_similarity(feats, txt)

        def itm_one(i, j):
            logits = tiny_model.itm_forward(ie[i : i + 1], tok["input_ids"][j : j + 1], tok["attention_mask"][j : j + 1])
            return float(logits[0, 1] if rule == "reference" else logits.log_softmax(-1)[0, 1])

        dense = retrieval.naive_protocol(sim, k, itm_one, 1.0 if rule == "reference" else temp)
    naive = retrieval.recall_metrics(*retrieval.ranks_from_dense(*dense, data.txt2img, data.img2txt))
    for key, v in naive.items():
        assert m[key] == pytest.approx(v, abs=1e-6), key  # the headline follows eval.rerank_score
        assert m[f"rerank_{rule}/{key}"] == m[key], key
    # ITC alone, reported beside: the dense ITC order, no ITM
    itc_only = retrieval.recall_metrics(*retrieval.ranks_from_dense(sim, sim.t(), data.txt2img, data.img2txt))
    for key, v in itc_only.items():
        assert m[f"itc_only/{key}"] == pytest.approx(v, abs=1e-6), key


def test_eval_set_from_shards_equals_from_annotations(synth):
    a = CaptionedImages.from_karpathy(synth["ann"]["test"], synth["root"])
    b = CaptionedImages.from_shards(sorted(str(p) for p in synth["test_shards"].glob("*.tar")))
    assert sorted(zip(a.image_ids, a.raw_captions)) == sorted(zip(b.image_ids, b.raw_captions))


def test_fast_protocol_equals_reference_style_baseline_with_duplicate_captions(synth, tmp_path):
    """The reference-style baseline of `blip2-bench eval` (one ITM call per image, then per text, texts
    padded to 35, dense matrices, stable argsort) and the fast path agree exactly, also when identical
    caption texts on several images produce exact score ties."""
    import json

    from helpers.tiny import tiny_stage1

    from blip2_train.data.datamodule import Blip2DataModule
    from blip2_train.bench.retrieval_baseline import evaluate_retrieval_one_at_a_time
    from blip2_train.eval.retrieval import evaluate_retrieval

    ann = json.loads(open(synth["ann"]["test"]).read())
    for i, entry in enumerate(ann):  # every third image shares a caption with the first image
        if i % 3 == 0:
            entry["caption"] = list(entry["caption"]) + [ann[0]["caption"][0]]
    path = tmp_path / "dups.json"
    path.write_text(json.dumps(ann))
    model = tiny_stage1(synth["tokenizer"], seed=2).eval()
    dm = Blip2DataModule(str(synth["tokenizer"]), eval_set={"annotation": str(path), "image_root": str(synth["root"])},
                         eval_batch_size=7, num_workers=0, image_size=32)
    data = dm.eval_data()
    fast = evaluate_retrieval(model, data, dm.eval_image_loader(), dm.tokenizer, (0, len(data)), 8, 13)
    base = evaluate_retrieval_one_at_a_time(model, data, dm.eval_image_loader(), dm.tokenizer, 8)
    for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert fast[k] == base[k], k


def test_itc_similarity_blocks_stay_under_the_budget_and_match_the_full_product(monkeypatch):
    """Chunked over images AND texts: no [images, Q, texts] block above ITC_BLOCK_BYTES, same matrix as one
    full product (bitwise up to the summation order of the matmul)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(37, 4, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(53, 8, generator=g), dim=-1)
    full = torch.einsum("iqd,td->iqt", feats, txt).amax(dim=1)
    blocks, einsum = [], torch.einsum

    def recording_einsum(*args):  # pass-through: records the size of every block
        out = einsum(*args)
        blocks.append(out.nbytes)
        return out

    monkeypatch.setattr(torch, "einsum", recording_einsum)
    budget = 4 * 4 * 10  # ten (image, text) columns of Q=4 fp32 values
    monkeypatch.setattr(retrieval, "ITC_BLOCK_BYTES", budget, raising=False)
    sim = retrieval.itc_similarity(feats, txt)
    assert max(blocks) <= budget and len(blocks) >= 37 * 53 // 10
    torch.testing.assert_close(sim, full, rtol=1e-6, atol=1e-7)
    monkeypatch.setattr(retrieval, "ITC_BLOCK_BYTES", 4 * 4 * 1000, raising=False)  # 18 images x all texts
    blocks.clear()
    torch.testing.assert_close(retrieval.itc_similarity(feats, txt), full, rtol=1e-6, atol=1e-7)
    assert len(blocks) == 3 and max(blocks) <= 4 * 4 * 1000


def test_candidates_tied_at_the_kth_are_the_smaller_columns():
    """Of the values tied at the k-th largest, the candidates are the smaller columns (the rule of every rank
    here), whatever order torch.topk returns them in; and, for rows full of ties, the set a stable descending
    sort's first k columns are."""
    sim = torch.tensor([[0.5, 0.75, 0.5, 0.5, 0.25, 0.5], [0.125, 0.125, 0.125, 0.125, 0.125, 0.125]])
    idx, val = retrieval.topk_smaller_index_first(sim, 2)
    assert idx.tolist() == [[0, 1], [0, 1]] and val.tolist() == [[0.5, 0.75], [0.125, 0.125]]
    g = torch.Generator().manual_seed(3)
    sim = torch.randint(0, 4, (37, 300), generator=g).float()  # a few values: ties everywhere
    for k in (1, 7, 64):
        idx, val = retrieval.topk_smaller_index_first(sim, k, rows_per_chunk=8)
        want = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
        assert torch.equal(idx, want.sort(dim=1).values) and torch.equal(val, sim.gather(1, idx))
    c_i2t, c_t2i = retrieval.topk_candidates(sim, 5)
    assert torch.equal(c_t2i.index, torch.sort(sim.t(), dim=1, descending=True, stable=True).indices[:, :5].sort(1).values)
