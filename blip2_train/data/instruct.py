"""InstructBLIP instruction tuning data: the paper's instruction templates, the decoder that turns one raw tar
sample into one instruction sample, and the square-root mixture of the instruction sets.

What the reference (Salesforce LAVIS, InstructBLIP) does, followed here:
- captions (its CaptionInstructDataset): the instruction is a caption template, the output the caption, cleaned
  as for captioning (`captions.clean_caption`) and drawn as `SampleDecoder` draws it;
- VQA (its COCOVQAInstructDataset, and OK-VQA / GQA likewise): the question cleaned by the reference's question
  processing (`vqa.clean_question`) and put in a VQA template; the output one of the question's human answers.
  The reference draws uniformly among the DISTINCT answers (`random.choice` over its answer-weight keys): one
  annotator's slip as often as nine annotators' consensus. By default (`data.vqa_answers=frequency`) each
  human answer is drawn equally often instead; `distinct` is the reference's rule;
- ready-made instructions (its LLaVA150kInstructDataset; our `instruct` and `llava` formats): instruction and
  answer as they are.
Every draw uses the `rng` the stream passes in, seeded per sample, so a resumed run draws the same templates.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence

from blip2_train.data.captions import clean_caption, pick_caption
from blip2_train.data.decode import SampleDecoder
from blip2_train.data.vqa import clean_question
from blip2_train.utils.errors import ConfigError

# The InstructBLIP paper's templates (appendix table of instruction templates), without its leading "<Image>":
# the image is the soft prompt (query tokens) in front of every instruction. `{}` is the question's slot.
CAPTION_TEMPLATES = (
    "A short image caption:",
    "A short image description:",
    "A photo of",
    "An image that shows",
    "Write a short description for the image.",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)
VQA_TEMPLATES = (
    "{}",
    "Question: {}",
    "{} A short answer to the question is",
    "Q: {} A:",
    "Question: {} Short answer:",
    "Given the image, answer the following question with no more than three words. {}",
    "Based on the image, respond to this question with a short answer: {}. Answer:",
    "Use the provided image to answer the question: {} Provide your answer as short as possible:",
    'What is the answer to the following question? "{}"',
    'The question "{}" can be answered using the image. A short answer is',
)
NO_TEXT = "no instruction or answer"
# How a VQA question's answer is drawn from its human answers: "frequency" = one of them (an answer given by nine
# annotators nine times as often as one given by one); "distinct" = uniformly among the distinct answers, as the
# reference's COCOVQAInstructDataset, where one annotator's slip is drawn as often as the consensus.
VQA_ANSWER_DRAWS = ("frequency", "distinct")


def check_templates(templates, slot: bool, where: str) -> tuple[str, ...]:
    """A non-empty list of non-empty strings; with `slot` (VQA) each has exactly one `{}` for the question,
    without (captions) none. Returns them as a tuple; ConfigError naming the config key `where` otherwise."""
    if isinstance(templates, (str, bytes)) or not isinstance(templates, Iterable):
        raise ConfigError(f"{where}: expected a list of templates, got {templates!r}")
    templates = tuple(templates)
    if not templates:
        raise ConfigError(f"{where}: the list of templates is empty")
    for t in templates:
        if not isinstance(t, str) or not t.strip():
            raise ConfigError(f"{where}: template {t!r} is not a non-empty string")
        if "<Image>" in t:
            raise ConfigError(f"{where}: template {t!r}: leave out '<Image>', the image goes in front of every "
                              "instruction as query tokens")
        n = t.count("{}")
        if slot and n != 1:
            raise ConfigError(f"{where}: template {t!r} needs exactly one '{{}}' for the question, it has {n}")
        if not slot and n:
            raise ConfigError(f"{where}: caption template {t!r} has a '{{}}' slot, but a caption has no question")
    return templates


def _pick(items: Sequence, rng: random.Random):
    return items[0] if len(items) == 1 else items[rng.randrange(len(items))]


def _meta(sample: dict) -> dict:
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


class InstructionDecoder(SampleDecoder):
    """Raw tar sample -> {image, instruction, answer, image_id, task} or None (skip, counted with its reason).

    A sample whose .json has `qa` gives one of its pairs, drawn uniformly: `{"instruction", "answer", "task"?}` as
    it is (task "instruction" unless it names one), `{"question", "answers"}` as task "vqa" in a drawn VQA
    template. Any other sample is read as `SampleDecoder` reads it (.json `caption`, else .txt): task "caption",
    a drawn caption template. The image (and its random crop) is decoded as `SampleDecoder` decodes it."""

    def __init__(self, transform, max_words: int = 50, max_pixels: int = 64_000_000, jpeg_draft: bool = True,
                 caption_templates: Sequence[str] = CAPTION_TEMPLATES, vqa_templates: Sequence[str] = VQA_TEMPLATES,
                 max_question_words: int = 50, vqa_answers: str = "frequency"):
        super().__init__(transform, max_words, max_pixels, jpeg_draft)
        self.caption_templates = check_templates(caption_templates, slot=False, where="caption_templates")
        self.vqa_templates = check_templates(vqa_templates, slot=True, where="vqa_templates")
        self.max_question_words = max_question_words
        if vqa_answers not in VQA_ANSWER_DRAWS:
            raise ConfigError(f"data.vqa_answers must be one of {VQA_ANSWER_DRAWS}, not {vqa_answers!r}")
        self.vqa_answers = vqa_answers

    def options_of(self, sample: dict) -> tuple[list[tuple], object]:
        """-> (the sample's usable texts, the json's image_id or None). Each text is ("caption", [captions]),
        ("vqa", question, [distinct answers]) or ("pair", task, instruction, answer); one is drawn per step."""
        meta = _meta(sample)
        if "qa" not in meta:
            caps, image_id = self.captions_of(sample)
            cleaned = [c for c in (clean_caption(c, self.max_words) for c in caps) if c]
            return ([("caption", cleaned)] if cleaned else []), image_id
        pairs = meta["qa"] if isinstance(meta["qa"], list) else []
        return [o for o in map(self._prepare, pairs) if o is not None], meta.get("image_id")

    def _prepare(self, pair) -> tuple | None:
        if not isinstance(pair, dict):
            return None
        if "instruction" in pair:
            instruction, answer = pair.get("instruction"), pair.get("answer")
            if not all(isinstance(t, str) and t.strip() for t in (instruction, answer)):
                return None
            return ("pair", str(pair.get("task") or "instruction"), instruction.strip(), answer.strip())
        question, answers = pair.get("question"), pair.get("answers")
        question = clean_question(question, self.max_question_words).strip() if isinstance(question, str) else ""
        answers = answers if isinstance(answers, list) else []
        answers = [a.strip() for a in answers if isinstance(a, str) and a.strip()]
        if self.vqa_answers == "distinct":  # in first-seen order: the same draw for the same seed
            answers = list(dict.fromkeys(answers))
        return ("vqa", question, answers) if question and answers else None

    def draw(self, option: tuple, rng: random.Random) -> tuple[str, str, str]:
        """One option of `options_of` -> (instruction, answer, task), its template and answer drawn with `rng`."""
        # the answer first: a caption sample then gets the caption SampleDecoder gives for the same seed
        if option[0] == "caption":
            answer = pick_caption(option[1], rng)
            return _pick(self.caption_templates, rng), answer, "caption"
        if option[0] == "vqa":
            answer = _pick(option[2], rng)
            return _pick(self.vqa_templates, rng).replace("{}", option[1], 1), answer, "vqa"
        _, task, instruction, answer = option
        return instruction, answer, task

    no_text = (NO_TEXT, NO_TEXT)

    def texts_of(self, sample: dict) -> tuple[list[tuple], object]:
        return self.options_of(sample)

    def fields(self, texts: list, rng: random.Random) -> dict:
        # drawn after the image, as SampleDecoder draws its caption: the same seed gives a caption sample the same
        # crop and caption from both decoders
        instruction, answer, task = self.draw(_pick(texts, rng), rng)
        return {"instruction": instruction, "answer": answer, "task": task}


def mixture_weights(sizes: dict[str, int | None], overrides: dict[str, float | None]) -> dict[str, float]:
    """The InstructBLIP paper's sampling of its instruction sets: each set drawn with probability proportional to
    the square root of its size (`sizes`: samples, None when unknown), except that a set's weight in `overrides`
    (not None) replaces its square root before normalising. -> weights that sum to 1."""
    unknown = sorted(k for k, w in overrides.items() if w is not None and k not in sizes)
    if unknown:
        raise ConfigError(f"weight given for {unknown}, which is not among the sets {list(sizes)}")
    raw = {}
    for name, size in sizes.items():
        w = overrides.get(name)
        if w is not None:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ConfigError(f"set {name!r}: weight must be a number >= 0, not {w!r}")
            raw[name] = float(w)
        elif size is None:
            raise ConfigError(f"set {name!r}: no manifest.json: give its weight")
        elif size < 0:
            raise ConfigError(f"set {name!r}: size {size} is below 0")
        else:
            raw[name] = math.sqrt(size)
    total = sum(raw.values())
    if total <= 0:
        raise ConfigError(f"the weights of the sets {list(sizes)} sum to 0: give one of them a weight above 0")
    return {name: w / total for name, w in raw.items()}
