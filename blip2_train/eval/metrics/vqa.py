"""VQA answer normalisation and accuracy, as the official VQA evaluation (and the reference's copy of it) computes
them. Pure functions: no model, no files.

- The prediction is always normalised: punctuation, then lower case, number words -> digits, articles dropped,
  contractions restored.
- Human answers get the punctuation step only, and only when the 10 humans disagree (the official script's rule:
  unanimous answers are compared as written).
- VQA accuracy: for each of the 10 leave-one-out subsets of the human answers, min(#matches among the other 9 / 3, 1),
  averaged over the 10 subsets. GQA (one answer) is exact match after normalising both sides.
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


def strip_punctuation(text: str) -> str:
    """The official punctuation step: a mark touching a space (or any mark, when the text has a digit,digit
    comma as in "1,000") is deleted, otherwise replaced by a space ("black-and-white" -> "black and white");
    then periods not followed by a digit are deleted."""
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


def normalize_answer(text: str) -> str:
    """A predicted answer as the official evaluation compares it."""
    return digits_and_articles(strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """The official VQA accuracy of one prediction against its (usually 10) human answers, in [0, 1]."""
    if not human_answers:
        raise ValueError("a VQA question needs at least one human answer")
    pred = normalize_answer(prediction)
    humans = list(human_answers)
    if len(set(humans)) > 1:
        humans = [strip_punctuation(a) for a in humans]
    scores = []
    for left_out in range(len(humans)):
        matches = sum(1 for j, a in enumerate(humans) if j != left_out and a == pred)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answer: str) -> float:
    """GQA: 1 when the normalised prediction equals the normalised answer."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def score_answers(predictions: list[str], answers: list[list[str]], metric: str = "vqa",
                  question_types: list[str] | None = None, answer_types: list[str] | None = None) -> tuple[dict, list]:
    """-> (metrics x100: `accuracy`, `question_type/<t>`, `answer_type/<t>`; per-question accuracies in [0, 1])."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if metric == "vqa":
        per = [vqa_accuracy(p, a) for p, a in zip(predictions, answers)]
    elif metric == "exact_match":
        per = [exact_match(p, a[0]) for p, a in zip(predictions, answers)]
    else:
        raise ValueError(f"VQA metric must be 'vqa' or 'exact_match', not {metric!r}")
    metrics = {"accuracy": 100.0 * sum(per) / max(1, len(per))}
    for prefix, types in (("question_type", question_types), ("answer_type", answer_types)):
        groups: dict[str, list[float]] = defaultdict(list)
        for t, acc in zip(types or [], per):
            if t:
                groups[str(t)].append(acc)
        metrics.update({f"{prefix}/{t}": 100.0 * sum(v) / len(v) for t, v in sorted(groups.items())})
    return metrics, per
