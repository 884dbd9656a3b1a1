"""VQA answer normalisation and accuracy, by the two rules of the official evaluation script
(GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py). Pure functions: no model, no files.

Both rules share the normalisation steps and the accuracy: for each of the 10 leave-one-out subsets of the human
answers, min(#matches among the other 9 / 3, 1), averaged over the 10 subsets. They differ in which texts are
normalised before comparing (`VQA_METRICS`, `eval.vqa_metric`):

- `reference`: the script as it stood from 2016 to March 2021 (the 2017 v2.0 release), which LAVIS copies
  (lavis/common/vqa_tools/vqa_eval.py) and which the published BLIP-2 val numbers used. The prediction is always
  normalised (punctuation, then lower case, number words -> digits, articles dropped, contractions restored);
  human answers get the punctuation step only, and only when the humans disagree; unanimous ones are compared as
  written (not even stripped of white space).
- `official`: the script since its March 2021 change ("Fixed processing answers bug"), the repository's current
  version. Prediction and human answers are stripped of surrounding white space; when the humans disagree, both
  sides get the full normalisation; when they are unanimous, neither is normalised.

So a unanimous "yes" scores the prediction "Yes." 1 under `reference` and 0 under `official`, and disagreeing
humans who wrote "two" or "a dog" match the prediction "2" or "dog" under `official` only. A prediction already
normalised (`submission_answer`) is compared the same way by both; what still differs is the human side where
the humans disagree and some of them wrote an answer that the normalisation changes.

GQA (one answer) is exact match after normalising both sides, under either rule.
"""

from __future__ import annotations

import re
from collections import defaultdict

NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!"]
# The official table: an apostrophe-less spelling -> the form human answers use.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit ("3.5" keeps its point)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# Which texts each rule normalises (module docstring); `reference` is the default, comparable with published numbers.
VQA_METRICS = ("reference", "official")


def strip_punctuation(text: str) -> str:
    """The scripts' punctuation step: a mark touching a space (or any mark, when the text has a digit,digit
    comma as in "1,000") is deleted, otherwise replaced by a space ("black-and-white" -> "black and white");
    then periods not followed by a digit are deleted. (The scripts pass re.UNICODE where re.sub takes its count,
    which caps that at 32 periods; no answer has so many.)"""
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in PUNCTUATION:
        if delete_all or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def digits_and_articles(text: str) -> str:
    """Lower case, number words -> digits, articles dropped, contractions restored, single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def strip_space(text: str) -> str:
    """New lines and tabs to spaces, the ends stripped: what both scripts do to a prediction first."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The full normalisation: white space, punctuation, then digits / articles / contractions. Applying it twice
    gives what applying it once does."""
    return digits_and_articles(strip_punctuation(strip_space(text)))


def submission_answer(prediction: str) -> str:
    """A prediction as written to the test-dev submission file: normalised, so that both rules read the same
    text on the prediction's side (`reference` normalises it again, to itself; `official` compares it as written
    where the humans agree and normalises it, to itself, where they disagree)."""
    return normalize_answer(prediction)


def _leave_one_out(pred: str, humans: list[str]) -> float:
    scores = []
    for left_out in range(len(humans)):
        matches = sum(1 for j, a in enumerate(humans) if j != left_out and a == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def reference_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The 2016-2021 script (LAVIS's copy): the prediction always normalised; the human answers untouched, or
    only punctuation-stripped where they disagree."""
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [strip_punctuation(a) for a in humans]
    return _leave_one_out(normalize_answer(prediction), humans)


def official_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The script since 2021: both sides white-space-stripped; fully normalised where the humans disagree,
    compared as written where they agree."""
    pred, humans = strip_space(prediction), [strip_space(a) for a in human_answers]
    if len(set(humans)) > 1:
        pred, humans = normalize_answer(pred), [normalize_answer(a) for a in humans]
    return _leave_one_out(pred, humans)


_RULES = {"reference": reference_accuracy, "official": official_accuracy}


def vqa_accuracy(prediction: str, human_answers: list[str], rule: str = "reference") -> float:
    """The VQA accuracy of one prediction against its (usually 10) human answers, in [0, 1], by `rule`
    (VQA_METRICS)."""
    if rule not in _RULES:
        raise ValueError(f"VQA accuracy rule must be one of {list(VQA_METRICS)}, not {rule!r}")
    if not human_answers:
        raise ValueError("a VQA question needs at least one human answer")
    return _RULES[rule](prediction, human_answers)


def exact_match(prediction: str, answer: str) -> float:
    """GQA: 1 when the normalised prediction equals the normalised answer."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def accuracies(predictions: list[str], answers: list[list[str]], metric: str = "vqa",
               rule: str = "reference") -> list[float]:
    """Per-question accuracies in [0, 1]: `metric` vqa (10 humans, by `rule`) or exact_match (GQA, any rule)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if metric == "vqa":
        return [vqa_accuracy(p, a, rule) for p, a in zip(predictions, answers)]
    if metric == "exact_match":
        return [exact_match(p, a[0]) for p, a in zip(predictions, answers)]
    raise ValueError(f"VQA metric must be 'vqa' or 'exact_match', not {metric!r}")


def score_answers(predictions: list[str], answers: list[list[str]], metric: str = "vqa",
                  question_types: list[str] | None = None, answer_types: list[str] | None = None,
                  rule: str = "reference") -> tuple[dict, list]:
    """-> (metrics x100, per-question accuracies in [0, 1] by `rule`).

    metrics: `accuracy`, `question_type/<t>`, `answer_type/<t>` by `rule`; for the 10-human sets (metric vqa)
    also `accuracy_<r>` for every rule r in VQA_METRICS (one of them equal to `accuracy`), from the same answers."""
    per = accuracies(predictions, answers, metric, rule)
    metrics = {"accuracy": _percent(per)}
    if metric == "vqa":
        for r in VQA_METRICS:
            metrics[f"accuracy_{r}"] = metrics["accuracy"] if r == rule else _percent(
                accuracies(predictions, answers, metric, r))
    for prefix, types in (("question_type", question_types), ("answer_type", answer_types)):
        groups: dict[str, list[float]] = defaultdict(list)
        for t, acc in zip(types or [], per):
            if t:
                groups[str(t)].append(acc)
        metrics.update({f"{prefix}/{t}": _percent(v) for t, v in sorted(groups.items())})
    return metrics, per


def _percent(per: list[float]) -> float:
    return 100.0 * sum(per) / max(1, len(per))
