"""VQA evaluation sets from the official files: one item per question, its image path, its human answers.

- VQAv2 / OK-VQA (`format: vqa`): the question file `{"questions": [{question_id, image_id, question}]}` and the
  annotation file `{"annotations": [{question_id, question_type, answer_type, answers: [{answer}, ...]}]}`;
  image paths from `image_template` (COCO: `val2014/COCO_val2014_{image_id:012d}.jpg`) under `image_root`.
  Without an annotation file (`annotations: null`: test-dev, whose answers only the evaluation server holds) the
  questions have no human answers: they are answered, not scored.
- GQA (`format: gqa`): `{question_id: {imageId, question, answer, types: {structural, detailed}}}`
  (testdev_balanced_questions.json), images `<image_root>/<imageId>.jpg`.

The items have `images` / `image_ids` as `CaptionedImages` has, so `EvalImageDataset` loads them unchanged.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from blip2_train.utils.errors import ConfigError, DataError

VQA_FORMATS = ("vqa", "gqa")
COCO_VAL2014 = "val2014/COCO_val2014_{image_id:012d}.jpg"
_QUESTION_MARKS = re.compile(r"([.!\"()*#:;~])")


def clean_question(question: str, max_words: int = 50) -> str:
    """The reference's question processing: lower case, these marks .!"()*#:;~ removed, at most max_words words
    (the question mark stays: "Question: what is it? Short answer:")."""
    words = _QUESTION_MARKS.sub("", question.lower()).rstrip().split(" ")
    return " ".join(words[:max_words])


@dataclass
class VqaQuestions:
    """`questions[k]` asks about image `images[k]` (a path); `answers[k]` are its human answers (none for a
    set read without annotations)."""

    question_ids: list = field(default_factory=list)
    image_ids: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)
    question_types: list[str] = field(default_factory=list)
    answer_types: list[str] = field(default_factory=list)
    metric: str = "vqa"  # vqa (10 human answers, leave-one-out) | exact_match (GQA)

    def __len__(self) -> int:
        return len(self.questions)


def _read_json(path, what: str):
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: not valid JSON ({e})") from e


def _field(rec: dict, key: str, where: str):
    if key not in rec:
        raise DataError(f"{where}: missing field '{key}'")
    return rec[key]


def read_vqa(questions: str | Path, annotations: str | Path | None, image_root: str | Path,
             image_template: str = COCO_VAL2014, limit: int | None = None, max_words: int = 50) -> VqaQuestions:
    """The official VQAv2 / OK-VQA question + annotation files. Every question needs an annotation; with
    `annotations` None (test-dev) every question has no human answers."""
    qs = _field(_read_json(questions, "VQA question file"), "questions", str(questions))
    by_qid = {}
    if annotations is not None:
        anns = _field(_read_json(annotations, "VQA annotation file"), "annotations", str(annotations))
        for n, a in enumerate(anns):
            by_qid[_field(a, "question_id", f"{annotations}: annotations[{n}]")] = a
    out = VqaQuestions(metric="vqa")
    for n, q in enumerate(qs[:limit]):
        where = f"{questions}: questions[{n}]"
        qid, image_id = _field(q, "question_id", where), _field(q, "image_id", where)
        a, answers = {}, []
        if annotations is not None:
            a = by_qid.get(qid)
            if a is None:
                raise DataError(f"{where}: question_id {qid} has no entry in {annotations}")
            answers = [_field(x, "answer", f"{annotations}: question_id {qid}: answers") for x in
                       _field(a, "answers", f"{annotations}: question_id {qid}")]
            if not answers:
                raise DataError(f"{annotations}: question_id {qid}: field 'answers' is empty")
        try:
            rel = image_template.format(image_id=image_id)
        except (ValueError, KeyError) as e:
            raise DataError(f"{where}: image_id {image_id!r} does not fit data.eval_set.image_template "
                            f"{image_template!r} ({e})") from e
        out.question_ids.append(qid)
        out.image_ids.append(str(image_id))
        out.images.append(os.path.join(image_root, rel))
        out.questions.append(clean_question(str(_field(q, "question", where)), max_words))
        out.answers.append([str(x) for x in answers])
        out.question_types.append(str(a.get("question_type", "")))
        out.answer_types.append(str(a.get("answer_type", "")))
    return out


def read_gqa(questions: str | Path, image_root: str | Path, limit: int | None = None,
             max_words: int = 50) -> VqaQuestions:
    """GQA's balanced question file (a dict question_id -> record); scored by exact match."""
    qs = _read_json(questions, "GQA question file")
    if not isinstance(qs, dict):
        raise DataError(f"{questions}: a GQA question file is a JSON object keyed by question id")
    out = VqaQuestions(metric="exact_match")
    for qid, q in list(qs.items())[:limit]:
        where = f"{questions}: question {qid}"
        image_id = str(_field(q, "imageId", where))
        types = q.get("types") or {}
        out.question_ids.append(qid)
        out.image_ids.append(image_id)
        out.images.append(os.path.join(image_root, f"{image_id}.jpg"))
        out.questions.append(clean_question(str(_field(q, "question", where)), max_words))
        out.answers.append([str(_field(q, "answer", where))])
        out.question_types.append(str(types.get("detailed", "")))
        out.answer_types.append(str(types.get("structural", "")))
    return out


def read_vqa_set(cfg: dict, max_words: int = 50) -> VqaQuestions:
    """`data.eval_set` with `format: vqa | gqa` -> the questions. `annotations: null` (format vqa): questions
    without human answers, as test-dev's file is."""
    fmt = cfg.get("format")
    for key in ("questions", "image_root"):
        if not cfg.get(key):
            raise ConfigError(f"data.eval_set.{key} is required with data.eval_set.format={fmt}")
    if fmt == "vqa":
        return read_vqa(cfg["questions"], cfg.get("annotations") or None, cfg["image_root"],
                        cfg.get("image_template") or COCO_VAL2014, cfg.get("limit"), max_words)
    return read_gqa(cfg["questions"], cfg["image_root"], cfg.get("limit"), max_words)
