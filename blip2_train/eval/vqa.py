"""Zero-shot VQA evaluation (VQAv2, OK-VQA, GQA): the reference's prompted beam search, sharded over ranks, merged,
scored on rank 0 with the VQA accuracy (`eval.metrics.vqa`) by both rules of the official script: the headline by
`eval.vqa_metric`, the other beside it.

Decoding as the reference (lavis/projects/blip2/eval/*_zeroshot_*_eval.yaml + predict_answers): beam 5, at most 10
and at least 1 new token, length penalty 0 for OPT (the reference's FlanT5 default is -1: set
eval.vqa_generate.length_penalty=-1 with model=stage2_flant5).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

from blip2_train.eval.metrics import vqa
from blip2_train.eval.generation import generate_on_every_rank, generate_texts
from blip2_train.distributed.collectives import rank
from blip2_train.utils.errors import ConfigError
from blip2_train.utils.io import write_json_atomic

log = logging.getLogger(__name__)

VQA_GENERATION = {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1, "length_penalty": 0.0}


def question_prompt(template: str, question: str) -> str:
    """The model's text.prompt with the question in its `{}` ("Question: {} Short answer:")."""
    return template.replace("{}", question)


def check_template(template: str) -> None:
    if template.count("{}") != 1:
        raise ConfigError(f"model.text.prompt must hold the question's place '{{}}' exactly once for VQA "
                          f"(e.g. 'Question: {{}} Short answer:'), not {template!r}")


def answer_questions(model, loader, tokenizer, data, template: str, generate_kwargs: dict,
                     image_blind: bool = False) -> list[tuple[int, str]]:
    """-> [(question index, answer)] for this rank's questions."""
    out = []
    for images, idx in tqdm(loader, desc="answer", disable=rank() != 0, leave=False):
        if image_blind:  # the same blank image for every question: what the language prior alone answers
            images = torch.zeros_like(images)
        prompts = [question_prompt(template, data.questions[i]) for i in idx.tolist()]
        out.extend(zip(idx.tolist(), generate_texts(model, tokenizer, images, prompts, generate_kwargs)))
    return out


def evaluate_vqa(model, data, loader, tokenizer, template: str, generate_kwargs: dict | None = None,
                 out_dir: str | Path | None = None, image_blind: bool = False,
                 vqa_metric: str = "reference") -> dict[str, float]:
    """Answer this rank's share of `data` (a VqaQuestions), merge on all ranks, score on rank 0.

    metrics (`vqa.score_answers`): `accuracy` and per-type by `vqa_metric`, `accuracy_reference` and
    `accuracy_official` for VQAv2 / OK-VQA; `num_scored` questions had human answers. A set without them (test-dev)
    has no accuracy keys: its answers are for the evaluation server.

    Writes `vqa_predictions.json` ([{question_id, answer, question, accuracy}], accuracy by `vqa_metric`, absent
    when not scored) beside the metrics, and for VQAv2 / OK-VQA `vqa_submission.json`, the server's result format
    [{question_id, answer}] with normalised answers. `image_blind`: `vqa_predictions_blind.json` only.
    """
    check_template(template)
    if vqa_metric not in vqa.VQA_METRICS:
        raise ConfigError(f"eval.vqa_metric={vqa_metric!r} is not one of {list(vqa.VQA_METRICS)}")
    kw = {**VQA_GENERATION, **dict(generate_kwargs or {})}
    t0 = time.perf_counter()
    merged = generate_on_every_rank(
        model, lambda: answer_questions(model, loader, tokenizer, data, template, kw, image_blind))
    metrics: dict[str, float] = {}
    if rank() == 0:
        if len(merged) != len(data):
            raise RuntimeError(f"{len(data) - len(merged)} of {len(data)} questions were not answered")
        order = range(len(data))
        preds = [merged[i] for i in order]
        per = None
        if any(data.answers):
            metrics, per = vqa.score_answers(preds, data.answers, data.metric, data.question_types,
                                             data.answer_types, rule=vqa_metric)
        elif not image_blind:
            log.warning("vqa: the eval set has no human answers (data.eval_set.annotations is null): accuracy is "
                        "not available; the answers for the evaluation server are vqa_submission.json")
        metrics["num_questions"] = float(len(data))
        metrics["num_scored"] = float(len(data) if per is not None else 0)
        if out_dir is not None:
            write_answers(Path(out_dir), data, preds, per, image_blind)
    metrics["eval_seconds"] = time.perf_counter() - t0
    log.info("vqa: %s", {k: round(v, 2) for k, v in metrics.items()})
    return metrics


def write_answers(out: Path, data, preds: list[str], per: list[float] | None, image_blind: bool) -> None:
    """The predictions (with their accuracy where scored) and, for the 10-human sets, the submission file: GQA's
    ids and server format are another's."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"question_id": data.question_ids[i], "answer": p, "question": data.questions[i]}
            for i, p in enumerate(preds)]
    if per is not None:
        for row, acc in zip(rows, per):
            row["accuracy"] = acc
    write_json_atomic(out / ("vqa_predictions_blind.json" if image_blind else "vqa_predictions.json"), rows,
                      sort_keys=False)
    if data.metric == "vqa" and not image_blind:
        submission = [{"question_id": data.question_ids[i], "answer": vqa.submission_answer(p)}
                      for i, p in enumerate(preds)]
        write_json_atomic(out / "vqa_submission.json", submission, sort_keys=False)
