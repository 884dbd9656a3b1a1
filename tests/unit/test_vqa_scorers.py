"""The two VQA accuracy rules of the official script (`reference`: its 2017 version, LAVIS's copy; `official`: its
version since 2021) on hand-computed cases that separate them, the submission file's answers, and the evaluation
on a set without human answers (test-dev)."""

from __future__ import annotations

import json

import pytest

from blip2_train.data.vqa import VqaQuestions
from blip2_train.eval.metrics import vqa

# Accuracy = mean over the 10 leave-one-out subsets of min(1, matches among the other 9 / 3). With k of the 10
# humans matching: k >= 4 -> 1.0; k = 3 -> (3 * 2/3 + 7 * 1) / 10 = 0.9; k = 2 -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6;
# k = 1 -> (1 * 0 + 9 * 1/3) / 10 = 0.3; k = 0 -> 0.


@pytest.mark.parametrize("prediction, humans, reference, official", [
    # unanimous "yes": reference normalises the prediction to "yes" (10 matches -> 1.0); official compares
    # "Yes." as written (0 matches -> 0.0)
    ("Yes.", ["yes"] * 10, 1.0, 0.0),
    # unanimous "2": reference reads "two" as "2" (1.0); official compares "two" as written (0.0)
    ("two", ["2"] * 10, 1.0, 0.0),
    # unanimous "dog": reference drops the article of "a dog" (1.0); official keeps it (0.0)
    ("a dog", ["dog"] * 10, 1.0, 0.0),
    # humans disagree, 3 wrote "two": reference only strips their punctuation, "two" != "2" (0 matches -> 0.0);
    # official normalises them too, 3 matches -> 0.9
    ("2", ["two"] * 3 + ["three"] * 7, 0.0, 0.9),
    # humans disagree, 2 wrote "a dog": reference 0 matches (0.0); official "dog" twice -> 0.6
    ("dog", ["a dog"] * 2 + ["cat"] * 8, 0.0, 0.6),
    # humans disagree, 4 wrote "Yes": reference keeps their capital (0 matches -> 0.0); official lower-cases,
    # 4 matches -> 1.0
    ("yes", ["Yes"] * 4 + ["no"] * 6, 0.0, 1.0),
    # humans disagree, 3 wrote "yes": both normalise the prediction "Yes." to "yes", 3 matches -> 0.9 under both
    ("Yes.", ["yes"] * 3 + ["no"] * 7, 0.9, 0.9),
    # unanimous humans who wrote "Yes.": both compare them as written, "yes" never equals "Yes." -> 0.0 under both
    ("yes", ["Yes."] * 10, 0.0, 0.0),
    # official strips white space around human answers, reference does not: "yes " != "yes" (0.0) vs 1.0
    ("yes", ["yes "] * 10, 0.0, 1.0),
])
def test_the_two_rules_on_hand_computed_cases(prediction, humans, reference, official):
    assert vqa.vqa_accuracy(prediction, humans, "reference") == pytest.approx(reference, abs=1e-12)
    assert vqa.vqa_accuracy(prediction, humans, "official") == pytest.approx(official, abs=1e-12)
    assert vqa.vqa_accuracy(prediction, humans) == vqa.vqa_accuracy(prediction, humans, "reference")  # the default


def test_unknown_rule_and_no_humans_are_refused():
    with pytest.raises(ValueError, match="must be one of"):
        vqa.vqa_accuracy("yes", ["yes"] * 10, "lavis")
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa.vqa_accuracy("yes", [], "official")


def test_score_answers_reports_both_rules_from_the_same_answers():
    preds = ["Yes.", "2", "red"]
    answers = [["yes"] * 10, ["two"] * 3 + ["three"] * 7, ["red"] * 10]
    types = {"question_types": ["is the", "how many", "what color"], "answer_types": ["yes/no", "number", "other"]}
    # per question, reference: 1.0, 0.0, 1.0 -> 200/3; official: 0.0, 0.9, 1.0 -> 190/3
    ref, per_ref = vqa.score_answers(preds, answers, **types)
    off, per_off = vqa.score_answers(preds, answers, rule="official", **types)
    assert per_ref == pytest.approx([1.0, 0.0, 1.0]) and per_off == pytest.approx([0.0, 0.9, 1.0])
    assert ref["accuracy"] == pytest.approx(200 / 3) and off["accuracy"] == pytest.approx(190 / 3)
    for m in (ref, off):  # both figures whatever the headline
        assert m["accuracy_reference"] == pytest.approx(200 / 3) and m["accuracy_official"] == pytest.approx(190 / 3)
    # the per-type figures follow the headline rule
    assert ref["answer_type/yes/no"] == pytest.approx(100.0) and off["answer_type/yes/no"] == pytest.approx(0.0)
    assert ref["question_type/how many"] == pytest.approx(0.0) and off["question_type/how many"] == pytest.approx(90)


def test_gqa_exact_match_is_the_same_under_both_rules():
    preds, answers = ["The Table.", "chair"], [["table"], ["bed"]]
    a, per_a = vqa.score_answers(preds, answers, metric="exact_match")
    b, per_b = vqa.score_answers(preds, answers, metric="exact_match", rule="official")
    assert a == b == {"accuracy": pytest.approx(50.0)} and per_a == per_b == [1.0, 0.0]


ODD_ANSWERS = ["Yes.", "two", "A dog", "The Cat!", "black-and-white", "1,000", "3.5", "isnt", "  no\n", "Ten.",
               "an apple; a pear", "it's (red)", "twas", "somebody'd", "a", "None", ""]


@pytest.mark.parametrize("answer", ODD_ANSWERS)
def test_normalisation_is_idempotent(answer):
    once = vqa.normalize_answer(answer)
    assert vqa.normalize_answer(once) == once == vqa.submission_answer(answer)


@pytest.mark.parametrize("answer", ODD_ANSWERS)
def test_a_normalised_answer_scores_the_same_under_both_rules(answer):
    """Against human answers already in normal form, unanimous or not, the submission's answer gets one score."""
    sub = vqa.submission_answer(answer)
    for humans in ([sub] * 10, [sub] * 3 + ["no"] * 7, ["yes"] * 10, ["2"] * 2 + ["dog"] * 8):
        assert vqa.vqa_accuracy(sub, humans, "reference") == vqa.vqa_accuracy(sub, humans, "official")


def test_what_normalising_the_submission_cannot_remove():
    """Disagreeing humans who wrote a non-normal answer: the rules differ on the human side, which a submission
    cannot change (the "two" case above, with the answer already normalised)."""
    sub = vqa.submission_answer("Two.")
    assert sub == "2"
    assert vqa.vqa_accuracy(sub, ["two"] * 3 + ["three"] * 7, "reference") == 0.0
    assert vqa.vqa_accuracy(sub, ["two"] * 3 + ["three"] * 7, "official") == pytest.approx(0.9)


def test_config_choices_are_the_scorers_own():
    from blip2_train.config.ranges import CHOICES

    assert CHOICES["eval.vqa_metric"] == vqa.VQA_METRICS


def test_protocol_default_is_reference_and_a_typo_is_one_line():
    from blip2_train.config.compose import compose
    from blip2_train.config.ranges import check_ranges
    from blip2_train.utils.errors import ConfigError

    assert compose("eval", ["experiment=vqa_vqav2_eval"]).eval.vqa_metric == "reference" == vqa.VQA_METRICS[0]
    with pytest.raises(ConfigError, match=r"eval.vqa_metric='oficial' must be one of \['reference', 'official'\]"):
        check_ranges(compose("eval", ["experiment=vqa_vqav2_eval", "eval.vqa_metric=oficial"]))


# -- the evaluation driver, with the answers given (no model) ----------------------------------------------------


def questions(with_answers: bool, metric: str = "vqa") -> VqaQuestions:
    return VqaQuestions(question_ids=[11, 12, 13], image_ids=["1", "2", "3"], images=["a", "b", "c"],
                        questions=["is it?", "how many?", "what is it?"],
                        answers=[["yes"] * 10, ["two"] * 3 + ["three"] * 7, ["dog"] * 10] if with_answers else [[]] * 3,
                        question_types=["is the", "how many", "what"] if with_answers else [""] * 3,
                        answer_types=["yes/no", "number", "other"] if with_answers else [""] * 3, metric=metric)


def run_vqa(monkeypatch, data, out, rule="reference", answers=("Yes.", "2", "A dog")):
    import torch

    from blip2_train.eval import vqa as driver

    monkeypatch.setattr(driver, "generate_on_every_rank", lambda model, produce: dict(enumerate(answers)))
    return driver.evaluate_vqa(torch.nn.Linear(1, 1), data, None, None, "Question: {} Short answer:", out_dir=out,
                               vqa_metric=rule)


@pytest.mark.parametrize("rule", ["reference", "official"])
def test_evaluation_writes_both_figures_and_the_submission(monkeypatch, tmp_path, rule):
    m = run_vqa(monkeypatch, questions(True), tmp_path, rule)
    # reference: "Yes." 1.0, "2" vs "two" x3 0.0, "A dog" vs unanimous "dog" 1.0 -> 200/3
    # official:  "Yes." 0.0, "2" vs "two" x3 0.9, "A dog" 0.0 -> 30.0
    assert m["accuracy_reference"] == pytest.approx(200 / 3) and m["accuracy_official"] == pytest.approx(30.0)
    assert m["accuracy"] == m[f"accuracy_{rule}"] and m["num_questions"] == m["num_scored"] == 3
    preds = json.loads((tmp_path / "vqa_predictions.json").read_text())
    assert [p["answer"] for p in preds] == ["Yes.", "2", "A dog"]
    assert [p["accuracy"] for p in preds] == pytest.approx([1.0, 0.0, 1.0] if rule == "reference" else [0.0, 0.9, 0.0])
    sub = json.loads((tmp_path / "vqa_submission.json").read_text())
    assert sub == [{"question_id": 11, "answer": "yes"}, {"question_id": 12, "answer": "2"},
                   {"question_id": 13, "answer": "dog"}]
    assert all(list(row) == ["question_id", "answer"] for row in sub)


def test_evaluation_without_human_answers_writes_the_submission(monkeypatch, tmp_path):
    m = run_vqa(monkeypatch, questions(False), tmp_path, answers=("Yes.", "Two!", "the dog"))
    assert m["num_questions"] == 3 and m["num_scored"] == 0
    assert not any(k.startswith("accuracy") or "/" in k for k in m)
    sub = json.loads((tmp_path / "vqa_submission.json").read_text())
    assert sub == [{"question_id": 11, "answer": "yes"}, {"question_id": 12, "answer": "2"},
                   {"question_id": 13, "answer": "dog"}]
    preds = json.loads((tmp_path / "vqa_predictions.json").read_text())
    assert [p["answer"] for p in preds] == ["Yes.", "Two!", "the dog"] and "accuracy" not in preds[0]


def test_gqa_writes_no_submission_and_a_bad_rule_is_refused(monkeypatch, tmp_path):
    from blip2_train.utils.errors import ConfigError

    gqa = VqaQuestions(question_ids=["a1"], image_ids=["1"], images=["x"], questions=["what?"], answers=[["table"]],
                       question_types=[""], answer_types=[""], metric="exact_match")
    m = run_vqa(monkeypatch, gqa, tmp_path, answers=("The table",))
    assert m["accuracy"] == 100.0 and "accuracy_official" not in m
    assert not (tmp_path / "vqa_submission.json").exists()
    with pytest.raises(ConfigError, match="eval.vqa_metric='lavis' is not one of"):
        run_vqa(monkeypatch, gqa, tmp_path, rule="lavis", answers=("The table",))


# -- a question file without annotations ------------------------------------------------------------------------


def test_a_question_file_alone_reads_without_answers(tmp_path):
    from blip2_train.data.vqa import read_vqa_set
    from blip2_train.utils.errors import ConfigError, DataError

    q = tmp_path / "test-dev.json"
    q.write_text(json.dumps({"questions": [{"question_id": 5, "image_id": 9, "question": "What is it?"}]}))
    cfg = {"format": "vqa", "questions": str(q), "annotations": None, "image_root": str(tmp_path),
           "image_template": "test2015/COCO_test2015_{image_id:012d}.jpg"}
    v = read_vqa_set(cfg)
    assert v.question_ids == [5] and v.answers == [[]] and v.metric == "vqa"
    assert v.images == [str(tmp_path / "test2015" / "COCO_test2015_000000000009.jpg")]
    assert read_vqa_set({k: x for k, x in cfg.items() if k != "annotations"}).answers == [[]]
    with pytest.raises(DataError, match="VQA annotation file not found"):  # named, but missing: still an error
        read_vqa_set({**cfg, "annotations": str(tmp_path / "nope.json")})
    with pytest.raises(ConfigError, match="data.eval_set.questions is required"):
        read_vqa_set({**cfg, "questions": None})
