"""The reference's retrieval re-ranking, kept as the baseline `blip2-bench eval` measures against.

Like LAVIS `compute_sim_matrix`: for each image, one ITM forward over its top-k texts; then for each text,
one ITM forward over its top-k images (pairs found in both directions are scored twice); dense score
matrices filled with -100; ranks by argsort. Same encoders and ITC as `eval.retrieval.evaluate_retrieval`.
"""

from __future__ import annotations

import time

import torch

from blip2_train.eval.metrics import retrieval
from blip2_train.eval.retrieval import encode_images, encode_texts


@torch.no_grad()
def evaluate_retrieval_one_at_a_time(model, data, image_loader, tokenizer, k_test: int = 128,
                                     max_txt_len: int = 35) -> dict[str, float]:
    device = next(model.parameters()).device
    model.eval()
    t0 = time.perf_counter()
    # the reference pads every text to 35 tokens
    tok = tokenizer(data.texts, padding="max_length", truncation=True, max_length=max_txt_len, return_tensors="pt")
    ids, mask = tok["input_ids"].to(device), tok["attention_mask"].to(device)
    image_embeds, image_feats = encode_images(model, image_loader, device)
    text_feat = encode_texts(model, ids, mask, device)
    sim = retrieval.itc_similarity(image_feats, text_feat).cpu()
    n_img, n_txt = sim.shape
    # non-candidates in ITC order below the candidates (exact R@K); float64 so that TAIL + itc keeps every digit
    score_i2t = sim.double() + retrieval.TAIL
    score_t2i = sim.t().double() + retrieval.TAIL
    for i in range(n_img):
        v, idx = sim[i].topk(min(k_test, n_txt))
        emb = image_embeds[i : i + 1].float().expand(idx.numel(), -1, -1)
        itm = model.itm_forward(emb, ids[idx], mask[idx])[:, 1].float().cpu()
        score_i2t[i, idx] = (itm + v).double()
    for j in range(n_txt):
        v, idx = sim[:, j].topk(min(k_test, n_img))
        itm = model.itm_forward(image_embeds[idx].float(), ids[j : j + 1].expand(idx.numel(), -1),
                                mask[j : j + 1].expand(idx.numel(), -1))[:, 1].float().cpu()
        score_t2i[j, idx] = (itm + v).double()
    r_i2t, r_t2i = retrieval.ranks_from_dense(score_i2t, score_t2i, data.txt2img, data.img2txt)
    metrics = retrieval.recall_metrics(r_i2t, r_t2i)
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics
