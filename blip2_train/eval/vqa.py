"""Zero-shot VQA evaluation (VQAv2, OK-VQA, GQA): the reference's prompted beam search, sharded over ranks, merged,
scored on rank 0 with the official accuracy (`eval.metrics.vqa`).

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
                 out_dir: str | Path | None = None, image_blind: bool = False) -> dict[str, float]:
    """Answer this rank's share of `data` (a VqaQuestions), merge on all ranks, score on rank 0.

    Writes `vqa_predictions.json` (the official result format, [{question_id, answer}], plus the question and
    its accuracy) beside the metrics; `image_blind`: `vqa_predictions_blind.json`.
    """
    check_template(template)
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
        metrics, per = vqa.score_answers(preds, data.answers, data.metric, data.question_types, data.answer_types)
        metrics["num_questions"] = float(len(data))
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            rows = [{"question_id": data.question_ids[i], "answer": preds[i],
                     "question": data.questions[i], "accuracy": per[i]} for i in order]
            name = "vqa_predictions_blind.json" if image_blind else "vqa_predictions.json"
            write_json_atomic(out / name, rows, sort_keys=False)
    metrics["eval_seconds"] = time.perf_counter() - t0
    log.info("vqa: %s", {k: round(v, 2) for k, v in metrics.items()})
    return metrics
