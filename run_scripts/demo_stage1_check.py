#!/usr/bin/env python
"""What each stage-1 objective learnt, measured on held-out images through the exported model:

- ITM (plain transformers: `Blip2ForImageTextRetrieval.from_pretrained(export)`, `use_image_text_matching_head`):
  how often the true caption gets a higher match probability than a RANDOM other caption, and than the HARDEST
  other caption (the most ITC-similar caption of another image whose text differs from every true caption);
- ITM's per-caption offset: the spread over held-out captions of each one's mean ITM log-odds against images it
  does not describe, beside the spread of true pairs' log-odds (an offset cancels in text->image re-ranking, not
  in image->text);
- ITM re-ranking of image->text R@1 as the retrieval evaluation computes it (its functions, on the export
  `blip2_train.load` gives: the ITC top k_test scored by eval.rerank_score), against ITC alone: the images it
  fixes and breaks, and what the caption it wrongly prefers changes of the image's scene
  (nothing: a duplicate's caption; only the positions; the number of shapes; their colours or kinds);
- the Q-Former LM: its per-token cross-entropy on the held-out captions (no label smoothing), beside the same
  model with the image replaced by a blank one (what the image adds to the generation loss).

    python run_scripts/demo_stage1_check.py outputs/demo/export_stage1 data/synthetic outputs/demo/stage1_check.json \
        [blip2-eval overrides: the evaluation's k_test and rerank_score are composed from experiment=retrieval_coco_eval
        and these]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from blip2_train.data.annotations import read_annotations
from blip2_train.data.eval_sets import CaptionedImages, load_eval_image
from blip2_train.data.transforms import EvalTransform


def tokenize(tok, texts: list[str]):
    return tok(texts, padding="longest", truncation=True, max_length=64, return_tensors="pt")


@torch.no_grad()
def itm_logits(model, pixels: torch.Tensor, enc) -> torch.Tensor:
    """[N, 2] ITM logits (no match, match) of pixels[n] with the tokenised text n."""
    return model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                 use_image_text_matching_head=True).logits_per_image


def itm_probs(model, pixels: torch.Tensor, tok, texts: list[str]) -> torch.Tensor:
    return itm_logits(model, pixels, tokenize(tok, texts)).softmax(dim=-1)[:, 1]


def itm_log_odds(model, pixels: torch.Tensor, tok, texts: list[str]) -> torch.Tensor:
    """[images, texts] ITM log-odds of a match (logit 1 - logit 0) of every image with every text."""
    enc = tokenize(tok, texts)
    logits = [itm_logits(model, image[None].expand(len(texts), -1, -1, -1), enc) for image in pixels]
    return torch.stack([row[:, 1] - row[:, 0] for row in logits])


def itm_text_offset(model, pixels: torch.Tensor, tok, test, rng: random.Random, n_images: int = 40,
                    n_texts: int = 80) -> dict[str, float]:
    """How much of ITM's score a caption carries whatever the image: each caption's mean log-odds against the
    images it does not describe, spread over captions (std), beside the spread of the true pairs' log-odds.
    Text->image re-ranking compares images for one caption, where such an offset cancels; image->text compares
    captions for one image, where it does not."""
    n_images = min(n_images, len(test))
    pool = [(i, c) for i in range(n_images) for c in test[i].captions]
    pool = rng.sample(pool, min(n_texts, len(pool)))
    odds = itm_log_odds(model, pixels[:n_images], tok, [c for _, c in pool])  # [images, texts]
    own = torch.tensor([i for i, _ in pool])
    true = torch.zeros_like(odds, dtype=torch.bool)
    true[own, torch.arange(len(pool))] = True
    for t, (_, c) in enumerate(pool):  # another image's identical caption is a true pair too
        true[[i for i in range(n_images) if c in test[i].captions], t] = True
    other_mean = (odds * ~true).sum(0) / (~true).sum(0).clamp(min=1)
    return {"itm_text_offset_std": other_mean.std().item(), "itm_true_log_odds_std": odds[true].std().item(),
            "itm_true_log_odds_mean": odds[true].mean().item(), "itm_other_log_odds_mean": odds[~true].mean().item()}


DIFFERENCES = ("same content", "position", "count", "objects")


def difference(scene: dict, other: dict) -> str:
    """What another image's scene changes of this one's: nothing ("same content": a true caption the metric
    counts as a miss), only where the shapes are ("position"), how many there are ("count"), or, as many, which
    colours and kinds ("objects")."""
    from blip2_train.demo.world import content_key

    if content_key(scene) == content_key(other):
        return "same content"
    if len(scene["objects"]) != len(other["objects"]):
        return "count"
    what = sorted((o["color"], o["shape"]) for o in scene["objects"])
    return "position" if what == sorted((o["color"], o["shape"]) for o in other["objects"]) else "objects"


@torch.no_grad()
def rerank_changes(scorer, pixels: torch.Tensor, captioned: CaptionedImages, scenes: list[dict],
                   k: int, rule: str = "reference") -> dict[str, int]:
    """Image->text R@1 as the retrieval evaluation computes it (`blip2_train.eval.metrics.retrieval`, on the export
    `blip2_train.load` gives: the ITC top k scored by `rule`, its tie rule), against ITC alone under the same tie
    rule: the images re-ranking fixes and breaks, and, where it breaks one, what the caption it prefers changes
    of the image's scene. `captioned`: the test split as the evaluation reads it (its cleaned texts)."""
    from blip2_train.eval.metrics import retrieval
    from blip2_train.eval.retrieval import itc_temperature

    m = scorer.model
    txt2img, img2txt = captioned.txt2img, captioned.img2txt
    enc = tokenize(scorer.tokenizer, captioned.texts)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    embeds, feats = m.retrieval_image_embeds(pixels)
    sim = retrieval.itc_similarity(feats, m.retrieval_text_feat(ids, mask))

    def pair_logits(pairs: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.itm_forward(embeds[p[:, 0]].float(), ids[p[:, 1]], mask[p[:, 1]]).float()
                          for p in pairs.split(256)])

    i2t, t2i = retrieval.rerank_all(sim, k, pair_logits, itc_temperature(m), rules=(rule,))[rule]
    reranked = retrieval.ranks_from_candidates(i2t, t2i, txt2img, img2txt, sim)[0]
    itc_alone = retrieval.itc_ranks(sim, txt2img, img2txt)[0]
    out = {"itm_rerank_i2t_fixed": int(((reranked == 0) & (itc_alone > 0)).sum()),
           "itm_rerank_i2t_broken": int(((itc_alone == 0) & (reranked > 0)).sum())}
    out.update({f"itm_rerank_i2t_broken_by_{d.replace(' ', '_')}": 0 for d in DIFFERENCES})
    for i in ((itc_alone == 0) & (reranked > 0)).nonzero().flatten().tolist():
        scores, index = i2t.score[i], i2t.index[i]
        winner = int(index[scores == scores.max()].min())  # the evaluation's tie rule: the smaller column
        out[f"itm_rerank_i2t_broken_by_{difference(scenes[i], scenes[txt2img[winner]]).replace(' ', '_')}"] += 1
    return out


@torch.no_grad()
def itc_scores(model, pixels: torch.Tensor, tok, texts: list[str]) -> torch.Tensor:
    """[images, texts] ITC similarity (transformers: the best query's cosine with the text's [CLS] feature)."""
    enc = tokenize(tok, texts)
    out = model(pixel_values=pixels, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                use_image_text_matching_head=False)
    assert out.logits_per_image.shape == (len(pixels), len(texts)), out.logits_per_image.shape
    return out.logits_per_image


@torch.no_grad()
def lm_loss(scorer, pixels: torch.Tensor, texts: list[str]) -> float:
    """Mean per-token cross-entropy of the Q-Former's LM head on `texts` given the images (`blip2_train.load` of
    the export: the LM head lives in the export's extras, which transformers has no place for)."""
    m = scorer.model
    enc = tokenize(scorer.tokenizer, texts)
    ids = enc["input_ids"].clone()
    ids[:, 0] = m.bos_token_id
    embeds = m.encode_image(pixels)
    _, logits = m.joint_lm_forward(embeds, ids, enc["attention_mask"])
    labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100).item()


def main() -> None:
    from transformers import Blip2ForImageTextRetrieval, Blip2Processor

    export, data, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    eval_overrides = sys.argv[4:]
    test = read_annotations(data / "coco" / "annotations" / "coco_karpathy_test.json", "karpathy")
    model = Blip2ForImageTextRetrieval.from_pretrained(str(export)).eval()
    tok = Blip2Processor.from_pretrained(str(export)).tokenizer
    size = json.loads((export / "blip2_train.json").read_text())["image_size"]
    transform = EvalTransform(size)
    pixels = torch.stack([load_eval_image(str(data / "coco" / "images" / r.image), transform) for r in test])
    # the scenes of the test images, in the annotation's order (the synthetic world's scenes.json)
    scenes_path = data / "coco" / "annotations" / "scenes.json"
    by_image = {s["image"]: s for s in json.loads(scenes_path.read_text())} if scenes_path.exists() else {}
    scenes = [by_image[r.image] for r in test] if all(r.image in by_image for r in test) else None
    # the re-ranking depth and score of the demo's retrieval evaluation, composed as blip2-eval composes them
    from blip2_train.config.compose import compose

    protocol = compose("eval", ["experiment=retrieval_coco_eval", *eval_overrides]).eval
    k_test, rule = int(protocol.k_test), str(protocol.rerank_score)
    rng = random.Random(0)
    true = [r.captions[0] for r in test]
    pool = [(i, c) for i, r in enumerate(test) for c in r.captions]

    def others(i):
        own = set(test[i].captions)
        return [c for j, c in pool if j != i and c not in own]

    rand = [rng.choice(others(i)) for i in range(len(test))]
    texts = [c for _, c in pool]
    sim = itc_scores(model, pixels, tok, texts)  # [images, all captions]
    hard = []
    for i in range(len(test)):
        own = set(test[i].captions)
        order = sim[i].argsort(descending=True).tolist()
        hard.append(next(texts[k] for k in order if pool[k][0] != i and texts[k] not in own))
    p_true, p_rand, p_hard = (torch.cat([itm_probs(model, pixels[b:b + 50], tok, t[b:b + 50])
                                         for b in range(0, len(t), 50)]) for t in (true, rand, hard))
    from blip2_train.api import load

    scorer = load(export, device="cpu")  # loaded once for both LM passes
    lm = lm_loss(scorer, pixels, true)
    lm_blind = lm_loss(scorer, torch.zeros_like(pixels), true)
    result = {
        "itm_true_over_random": (p_true > p_rand).float().mean().item(),
        "itm_true_over_hard": (p_true > p_hard).float().mean().item(),
        "itm_match_prob_true": p_true.mean().item(),
        "itm_match_prob_random": p_rand.mean().item(),
        "itm_match_prob_hard": p_hard.mean().item(),
        "qformer_lm_loss_heldout": lm,
        "qformer_lm_loss_heldout_blank_image": lm_blind,
        "pairs": len(test),
        **itm_text_offset(model, pixels, tok, test, rng),
    }
    if scenes is not None:
        captioned = CaptionedImages.from_karpathy(data / "coco" / "annotations" / "coco_karpathy_test.json",
                                                  data / "coco" / "images")
        result.update(rerank_changes(scorer, pixels, captioned, scenes, k_test, rule))
        result["rerank_score"] = rule
    out.write_text(json.dumps(result, indent=1))
    for k, v in result.items():
        print(f"{k:<40}{v:.4f}" if isinstance(v, float) else f"{k:<40}{v}")


if __name__ == "__main__":
    main()
