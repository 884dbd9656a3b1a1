"""Zero-shot classification's parts on a tiny real stage-1 model: prompt ensembling, ITC scores, ITM re-ranking,
the accuracy metrics, the image-folder / CSV readers and their refusals, unreadable images as counted skips."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from blip2_train.data.image_folder import read_image_csv, read_image_folder
from blip2_train.demo.world import write_classify_folder
from blip2_train.eval.classify import (DEFAULT_TEMPLATES, ENSEMBLES, ZeroShotClassifier, accuracy_metrics,
                                       check_classes, check_templates, confusion_matrix, fill)
from blip2_train.eval.metrics.retrieval import itc_similarity
from blip2_train.utils.errors import ConfigError, DataError

CLASSES = ["red", "green", "blue", "yellow", "purple"]
TEMPLATES = ["a {} circle", "there is a {} square at the top left"]


def encode_one(model, tokenizer, text: str) -> torch.Tensor:
    tok = tokenizer([text], return_tensors="pt")
    return model.retrieval_text_feat(tok["input_ids"], tok["attention_mask"])[0]


def test_mean_ensemble_is_the_renormalised_mean_of_prompt_features_and_max_the_best_prompt(tiny_model, tokenizer):
    """Each prompt encoded alone (no padding) gives the feature the batched, padded encoding gives; "mean" scores
    against the renormalised mean of a class's prompt features, "max" takes the best prompt's ITC."""
    tiny_model.eval()
    head = ZeroShotClassifier(tiny_model, tokenizer, CLASSES, TEMPLATES, "mean", text_batch_size=3)
    alone = torch.stack([torch.stack([encode_one(tiny_model, tokenizer, fill(t, c)) for t in TEMPLATES])
                         for c in CLASSES])  # [C, T, D]
    assert torch.allclose(head.text_feats, alone, atol=1e-5)
    assert torch.allclose(head.class_feats, F.normalize(alone.mean(dim=1), dim=-1), atol=1e-5)
    feats = tiny_model.retrieval_image_embeds(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))[1]
    assert torch.allclose(head.itc(feats), itc_similarity(feats, F.normalize(alone.mean(dim=1), dim=-1)), atol=1e-5)
    best = ZeroShotClassifier(tiny_model, tokenizer, CLASSES, TEMPLATES, "max")
    per_prompt = torch.stack([itc_similarity(feats, alone[:, t]) for t in range(len(TEMPLATES))], dim=2)
    assert torch.allclose(best.itc(feats), per_prompt.amax(dim=2), atol=1e-5)
    assert not torch.allclose(best.itc(feats), head.itc(feats), atol=1e-3)  # the two rules differ
    assert fill("a photo of a {}.", "Golden Retriever") == "a photo of a golden retriever"  # cleaned as captions


def test_itm_match_probability_is_averaged_over_a_class_prompts(tiny_model, tokenizer):
    """Pairs batched across images, classes and prompts give each pair's probability as one pair alone does."""
    tiny_model.eval()
    head = ZeroShotClassifier(tiny_model, tokenizer, CLASSES, TEMPLATES, "mean")
    best = ZeroShotClassifier(tiny_model, tokenizer, CLASSES, TEMPLATES, "max")
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds = tiny_model.retrieval_image_embeds(pixels)[0]
    cand = torch.tensor([[0, 2], [4, 1], [3, 0]])
    p, pmax = head.itm_prob(embeds, cand, pair_batch_size=3), best.itm_prob(embeds, cand, pair_batch_size=5)
    for i in range(3):
        for j, c in enumerate(cand[i].tolist()):
            probs = []
            for t in TEMPLATES:  # one pair at a time, unpadded
                tok = tokenizer([fill(t, CLASSES[c])], return_tensors="pt")
                with torch.no_grad():
                    logits = tiny_model.itm_forward(embeds[i : i + 1], tok["input_ids"], tok["attention_mask"])
                probs.append(float(logits.softmax(dim=-1)[0, 1]))
            assert float(p[i, j]) == pytest.approx(sum(probs) / len(probs), abs=1e-5)
            assert float(pmax[i, j]) == pytest.approx(max(probs), abs=1e-5)


class GivenMatch(ZeroShotClassifier):
    """The ranking rule alone: ITM probabilities given per class (the real ones are checked above)."""

    def __init__(self, *args, match: dict, **kw):
        super().__init__(*args, **kw)
        self.match = match

    def itm_prob(self, image_embeds, candidates, pair_batch_size=256):
        return torch.tensor([[self.match[c] for c in row] for row in candidates.tolist()])


def test_itm_reranks_the_top_k_and_keeps_the_rest_in_itc_order(tiny_model, tokenizer):
    tiny_model.eval()
    # ITC order of one image: made up so that the classes come in a known order
    feats = torch.zeros(1, 1, 16)
    head = GivenMatch(tiny_model, tokenizer, CLASSES, TEMPLATES, match={0: 0.2, 1: 0.9, 2: 0.9, 3: 0.99, 4: 0.1})
    head.class_feats = F.normalize(torch.eye(16)[:5] + torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1])[:, None], dim=-1)
    feats[0, 0] = F.normalize(torch.ones(16), dim=0)  # cosine with class c falls with c: ITC order 0 1 2 3 4
    plain = head.rank_features(None, feats, topk=5)
    assert plain.top.tolist() == [[0, 1, 2, 3, 4]] and torch.isnan(plain.itm).all()
    assert (plain.itc[:, :-1] >= plain.itc[:, 1:]).all()
    r = head.rank_features(None, feats, topk=5, itm_topk=3)
    # the 3 best by ITC (0, 1, 2) ordered by ITM (1 and 2 tie at 0.9: ITC's order kept), then 3, 4 by ITC;
    # class 3's 0.99 never counts: it was not an ITM candidate
    assert r.top.tolist() == [[1, 2, 0, 3, 4]] and r.itc_top.tolist() == [[0, 1, 2, 3, 4]]
    assert r.itm[0, :3].tolist() == pytest.approx([0.9, 0.9, 0.2]) and torch.isnan(r.itm[0, 3:]).all()
    assert r.itc[0].tolist() == [float(plain.itc[0, c]) for c in (1, 2, 0, 3, 4)]
    out = head.results(head.rank_features(None, feats, topk=2, itm_topk=3))[0]
    assert [o["label"] for o in out] == ["green", "blue"] and out[0]["itm"] == pytest.approx(0.9)
    assert "itm" not in head.results(plain)[0][0]


def test_accuracy_metrics_and_confusion():
    classes = ["a", "b", "c", "d"]
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    top = torch.tensor([[0, 1], [1, 0], [1, 2], [2, 3], [0, 1], [3, 0]])  # top-1 hits: 1/2, 1/3, 0/1
    m = accuracy_metrics(top, labels, classes)
    assert m["top1"] == pytest.approx(100 * 2 / 6) and m["top5"] == pytest.approx(100 * 4 / 6)
    assert m["per_class/a"] == 50.0 and m["per_class/b"] == pytest.approx(100 / 3) and m["per_class/c"] == 0.0
    assert "per_class/d" not in m  # no images: not in the mean either
    assert m["mean_per_class"] == pytest.approx((50 + 100 / 3 + 0) / 3)
    conf = confusion_matrix(top[:, 0], labels, 4)
    assert conf.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]


def test_bad_class_lists_and_templates_are_one_line_config_errors():
    for bad, words in (([], "empty"), (["", " "], "empty"), (["cat", ""], "empty name"), (["cat", "cat"], "twice"),
                       ("cat,dog", "list")):
        with pytest.raises(ConfigError, match=words):
            check_classes(bad)
    with pytest.raises(ConfigError, match=r"'a photo of a cat' has no '\{\}'"):
        check_templates(["a photo of a {}", "a photo of a cat"])
    with pytest.raises(ConfigError, match="no prompt template"):
        check_templates([])
    assert check_templates(None) == list(DEFAULT_TEMPLATES) and check_templates("a {}") == ["a {}"]


def test_settings_agree_with_the_config():
    from blip2_train.config.compose import compose
    from blip2_train.config.ranges import CHOICES, CLASSIFY_ENSEMBLES

    assert CLASSIFY_ENSEMBLES == ENSEMBLES and CHOICES["eval.classify.ensemble"] == ENSEMBLES
    cfg = compose("eval", ["experiment=classify_zeroshot_eval"])
    assert cfg.eval.kind == "classify" and list(cfg.eval.classify.templates) == list(DEFAULT_TEMPLATES)
    assert cfg.eval.classify.itm_topk == 0 and cfg.data.eval_set.format == "image_folder"


def test_image_folder_names_classes_and_leaves_out_what_is_not_an_image(tmp_path):
    root = write_classify_folder(tmp_path / "set", "shape", per_class=2, seed=0)
    (root / "circle").rename(root / "round_thing")
    (root / "square" / "notes.txt").write_text("not an image")
    (root / "square" / ".hidden.jpg").write_bytes(b"")
    (root / "triangle" / "more").mkdir()
    (root / "triangle" / "0000.jpg").rename(root / "triangle" / "more" / "0000.jpg")  # nested: still its class
    (root / "README.md").write_text("files at the root are not classes")
    data = read_image_folder(root)
    assert data.classes == ["round thing", "square", "triangle"] and len(data) == 6
    assert data.labels == [0, 0, 1, 1, 2, 2] and "triangle/more/0000.jpg" in data.image_ids
    (root / "classes.txt").write_text("round_thing circle\nsquare a square\ntriangle triangle\n")
    assert read_image_folder(root).classes == ["circle", "a square", "triangle"]
    assert read_image_folder(root, limit=3).labels == [0, 0, 1]
    (root / "classes.txt").write_text("round_thing circle\nsquare square\n")
    with pytest.raises(DataError, match="1 class.*not in its class map: triangle"):
        read_image_folder(root)
    (root / "classes.txt").write_text("round_thing circle\nsquare circle\ntriangle triangle\n")
    with pytest.raises(DataError, match="both named 'circle'"):
        read_image_folder(root)


def test_folders_and_csvs_without_images_are_one_line(tmp_path):
    with pytest.raises(DataError, match="image folder not found"):
        read_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        read_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "cat").mkdir()
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images in its 1 class folder"):
        read_image_folder(tmp_path / "empty")
    csv = tmp_path / "labels.csv"
    csv.write_text("image,label\n")
    with pytest.raises(DataError, match="no images in this file"):
        read_image_csv(csv)
    csv.write_text("path,class\na.jpg,cat\n")
    with pytest.raises(DataError, match="expected a header 'image,label'"):
        read_image_csv(csv)
    csv.write_text("image,label\na.jpg,cat\nb.jpg,\n")
    with pytest.raises(DataError, match=r"labels.csv:3: field 'label' is empty"):
        read_image_csv(csv)
    csv.write_text("image,label\nx/a.jpg,sea_lion\nb.jpg,cat\nc.jpg,sea_lion\n")
    data = read_image_csv(csv, image_root=tmp_path / "imgs")
    assert data.classes == ["cat", "sea lion"] and data.labels == [1, 0, 1]
    assert data.images[0] == str(tmp_path / "imgs" / "x" / "a.jpg") and data.image_ids[0] == "x/a.jpg"


def test_an_unreadable_image_is_a_counted_skip_named_once(tiny_model, tokenizer, tmp_path, caplog):
    from blip2_train.data.image_folder import labelled_image_loader
    from blip2_train.eval.classify import evaluate_classify

    root = write_classify_folder(tmp_path / "set", "color", per_class=3, seed=0, num_colors=3)
    (root / "green" / "0001.jpg").write_bytes(b"")  # 0 bytes
    (root / "blue" / "0002.jpg").write_text("not a jpeg")
    data = read_image_folder(root)
    with caplog.at_level(logging.WARNING, logger="blip2_train.eval.classify"):
        m = evaluate_classify(tiny_model, data, labelled_image_loader(data, 32, 4, 0), tokenizer, ["a {} circle"],
                              out_dir=tmp_path)
    assert m["num_skipped"] == 2 and m["num_images"] == 7 and m["num_classes"] == 3
    assert m["chance_top1"] == pytest.approx(100 / 3) and 0 <= m["top1"] <= m["top5"] == 100.0
    counted = [r.getMessage() for r in caplog.records if "skipped 2 unreadable image(s) of 9" in r.getMessage()]
    assert len(counted) == 1 and "green/0001.jpg" in counted[0] and "blue/0002.jpg" in counted[0]
    import json

    preds = json.loads((tmp_path / "classify_predictions.json").read_text())
    assert [p["image"] for p in preds["predictions"] if p.get("skipped")] == ["blue/0002.jpg", "green/0001.jpg"]
    assert sum(map(sum, preds["confusion"])) == 7 and (tmp_path / "classify_confusion.png").stat().st_size > 1000
