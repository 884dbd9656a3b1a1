"""Annotation readers: every supported format -> a list of `ImageRecord` (one per image, all its captions or all
its question/answer pairs).

Caption formats
- `karpathy`: the COCO / Flickr30k Karpathy JSON the reference uses: a list of `{image, caption, image_id?}`
  where `caption` is a string (train files: one entry per caption) or a list (val/test files).
- `vg`: Visual Genome, either the reference's `vg_caption.json` (Karpathy-like) or the raw
  `region_descriptions.json` (`[{id, regions: [{image_id, phrase}]}]`; images at `<image_id>.jpg`).
- `jsonl` / `csv`: generic files with `image` and `caption` columns (`image_id` optional).
- `coco`: a COCO caption annotation file (`{images: [{id, file_name, domain?}], annotations: [{image_id,
  caption}]}`), e.g. NoCaps val (`nocaps_val_4500_captions.json`, whose images carry in/near/out `domain`).

Instruction formats (`PAIR_FORMATS`): records carry pairs in `qa` instead of captions, either ready-made
`{"instruction", "answer", "task"?}` or VQA training data `{"question", "answers": [...], "question_id"}` whose
instruction template is drawn at training time (`blip2_train.data.instruct`); an image's entries make one record.
- `instruct`: JSONL, one `{image, instruction, answer, image_id?, task?}` per line.
- `llava`: LLaVA conversation JSON, `<image>` markers removed. `turns="first"` keeps the first human/gpt pair (the
  reference); `"all"` one pair per gpt turn whose instruction holds the earlier turns as BLIP-2's chat prompt does:
  `Question: q1 Answer: a1 Question: q2 Answer:` (see `llava_instruction`).
- `vqa`: VQAv2 / OK-VQA training files, `QUESTIONS.json,ANNOTATIONS.json`; `gqa`: GQA training questions. Their
  field conventions are the eval readers' (`blip2_train.data.vqa`); questions are stored raw, cleaned when drawn.
"""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from blip2_train.data.captions import as_caption_list
from blip2_train.utils.errors import DataError

CAPTION_FORMATS = ("karpathy", "vg", "jsonl", "csv", "coco")


@dataclass
class ImageRecord:
    image: str  # path relative to the image root
    image_id: str
    captions: list[str] = field(default_factory=list)
    domain: str | None = None  # NoCaps: in-domain / near-domain / out-domain
    qa: list[dict] = field(default_factory=list)  # question/answer pairs (instruction formats), see the docstring


def _group(entries, path: Path) -> list[ImageRecord]:
    """Merge entries of the same image (train files repeat the image once per caption), keeping order."""
    by_image: "OrderedDict[str, ImageRecord]" = OrderedDict()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i} is a {type(entry).__name__}, expected an object with 'image' and 'caption'")
        if "image" not in entry:
            raise DataError(f"{path}: entry {i} has no 'image' field")
        image = str(entry["image"])
        caps = as_caption_list(entry.get("caption"))
        if "caption" in entry and not caps and entry["caption"] not in ("", None, []):
            raise DataError(f"{path}: entry {i} ({image}): field 'caption' must be a string or a list of strings")
        image_id = str(entry.get("image_id", Path(image).stem))
        rec = by_image.get(image)
        if rec is None:
            rec = by_image[image] = ImageRecord(image=image, image_id=image_id)
        rec.captions.extend(caps)
    return list(by_image.values())


def _load_json(path: Path):
    if not path.exists():
        raise DataError(f"annotation file not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e


def read_karpathy(path: Path) -> list[ImageRecord]:
    data = _load_json(path)
    if isinstance(data, dict) and "images" in data:  # the original Karpathy dataset_coco.json layout
        entries = []
        for i, img in enumerate(data["images"] if isinstance(data["images"], list) else [data["images"]]):
            if not isinstance(img, dict) or "filename" not in img:
                hint = " (this looks like a COCO caption file: use format=coco)" if isinstance(img, dict) and \
                    "file_name" in img else ""
                raise DataError(f"{path}: images[{i}] has no 'filename' field: expected a list of {{image, caption}} "
                                f"objects or the Karpathy dataset_*.json layout{hint}")
            image = f"{img['filepath']}/{img['filename']}" if "filepath" in img else img["filename"]
            caps = [s["raw"] for s in img.get("sentences", [])]
            entries.append({"image": image, "caption": caps, "image_id": img.get("cocoid", img.get("imgid"))})
        data = entries
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{image, caption}} objects, got a {type(data).__name__}")
    return _group(data, path)


def read_visual_genome(path: Path) -> list[ImageRecord]:
    data = _load_json(path)
    if isinstance(data, list) and data and isinstance(data[0], dict) and "regions" in data[0]:
        records = []
        for i, item in enumerate(data):
            regions = item.get("regions") or []
            if not regions:
                continue
            image_id = str(regions[0].get("image_id", item.get("id", i)))
            caps = [r["phrase"] for r in regions if isinstance(r.get("phrase"), str)]
            records.append(ImageRecord(image=f"{image_id}.jpg", image_id=image_id, captions=caps))
        return records
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list (vg_caption.json or region_descriptions.json)")
    return _group(data, path)


def _jsonl(path: Path):
    """-> (line number, object) for each non-blank line."""
    if not path.exists():
        raise DataError(f"annotation file not found: {path}")
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e})") from e


def read_jsonl(path: Path) -> list[ImageRecord]:
    return _group([entry for _, entry in _jsonl(path)], path)


def read_csv(path: Path) -> list[ImageRecord]:
    if not path.exists():
        raise DataError(f"annotation file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"image", "caption"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: CSV header lacks column(s) {sorted(missing)}")
        return _group(list(reader), path)


def read_coco_captions(path: Path) -> list[ImageRecord]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: expected a COCO caption file, an object with an 'images' list and an 'annotations' list")
    records: "OrderedDict[str, ImageRecord]" = OrderedDict()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DataError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        records[str(img["id"])] = ImageRecord(image=img["file_name"], image_id=str(img["id"]), domain=img.get("domain"))
    for j, ann in enumerate(data.get("annotations") or []):
        rec = records.get(str(ann.get("image_id"))) if isinstance(ann, dict) else None
        if rec is None:
            raise DataError(f"{path}: annotations[{j}] refers to image_id {ann.get('image_id') if isinstance(ann, dict) else ann!r}, "
                            "which is not in 'images'")
        rec.captions.extend(as_caption_list(ann.get("caption")))
    return list(records.values())


# Instruction formats: records with question/answer pairs (`qa`) instead of captions.

PAIR_FORMATS = ("instruct", "llava", "vqa", "gqa", "vg_qa")
FORMATS = CAPTION_FORMATS + PAIR_FORMATS
LLAVA_TURNS = ("first", "all")
COCO_TRAIN2014 = "train2014/COCO_train2014_{image_id:012d}.jpg"  # VQAv2 and OK-VQA train on COCO train2014


def _obj(value, where: str, what: str) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"{where}: a {type(value).__name__}, expected an object with {what}")
    return value


def _need(obj: dict, key: str, where: str, kind: type | None = None):
    if key not in obj:
        raise DataError(f"{where}: missing field '{key}'")
    if kind is not None and not isinstance(obj[key], kind):
        raise DataError(f"{where}: field '{key}' must be of type {kind.__name__}, not {type(obj[key]).__name__}")
    return obj[key]


def _text(obj: dict, key: str, where: str, drop: str = "") -> str:
    """A required string field, stripped (of `drop` too); empty is an error."""
    value = _need(obj, key, where, str)
    value = (value.replace(drop, "") if drop else value).strip()
    if not value:
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def _record(records: "OrderedDict[str, ImageRecord]", image: str, image_id) -> ImageRecord:
    """The record of `image`, made on its first entry: an image with several entries is one sample."""
    if image not in records:
        records[image] = ImageRecord(image=image, image_id=str(image_id))
    return records[image]


def read_instruct(path: Path) -> list[ImageRecord]:
    """JSONL, one `{"image", "instruction", "answer", "image_id"?, "task"?}` per line; lines of one image (in
    file order) make one record."""
    records: "OrderedDict[str, ImageRecord]" = OrderedDict()
    for lineno, entry in _jsonl(path):
        where = f"{path}:{lineno}"
        _obj(entry, where, "'image', 'instruction' and 'answer'")
        image = _text(entry, "image", where)
        pair = {"instruction": _text(entry, "instruction", where), "answer": _text(entry, "answer", where)}
        if entry.get("task") is not None:
            pair["task"] = str(entry["task"])
        _record(records, image, entry.get("image_id", Path(image).stem)).qa.append(pair)
    return list(records.values())


def _llava_pairs(conv, where: str, turns: str) -> list[tuple[str, str]]:
    """(human, gpt) texts of a LLaVA conversation, `<image>` markers removed and stripped as the reference's
    LLaVA150kInstructDataset does. Turns must alternate human, gpt from the start; `first` checks and keeps only
    the first pair (the reference), `all` the whole conversation, which must end on a gpt turn."""
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of turns")
    n = len(conv) if turns == "all" else min(len(conv), 2)
    texts = []
    for k in range(n):
        turn_where, want = f"{where}: conversations[{k}]", ("human", "gpt")[k % 2]
        turn = _obj(conv[k], turn_where, "'from' and 'value'")
        if turn.get("from") != want:
            raise DataError(f"{turn_where}: field 'from' is {turn.get('from')!r}, expected {want!r} "
                            "(turns alternate human, gpt)")
        texts.append(_text(turn, "value", turn_where, drop="<image>"))
    if n % 2:
        raise DataError(f"{where}: conversations[{n - 1}]: a 'human' turn without a following 'gpt' turn")
    return list(zip(texts[::2], texts[1::2]))


def llava_instruction(context: list[tuple[str, str]], question: str) -> str:
    """A turn's instruction: the question alone when it opens the conversation (the reference's first pair),
    else the earlier turns before it as BLIP-2's chat prompt has them: `Question: q1 Answer: a1 Question: q2
    Answer:` (LAVIS's BLIP-2 demo, without its period after each answer: LLaVA answers end in their own)."""
    if not context:
        return question
    return " ".join(f"Question: {q} Answer: {a}" for q, a in context) + f" Question: {question} Answer:"


def read_llava(path: Path, turns: str = "first") -> list[ImageRecord]:
    """LLaVA conversation JSON: `[{"image", "conversations": [{"from": "human"|"gpt", "value"}, ...], "id"?}]`.
    `turns="first"`: one pair per entry; `"all"`: one pair per gpt turn, see `llava_instruction`."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{image, conversations}} objects, "
                        f"got a {type(data).__name__}")
    records: "OrderedDict[str, ImageRecord]" = OrderedDict()
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        _obj(entry, where, "'image' and 'conversations'")
        image = _text(entry, "image", where)
        pairs = _llava_pairs(_need(entry, "conversations", where), where, turns)
        rec = _record(records, image, entry.get("id", Path(image).stem))
        for j, (question, answer) in enumerate(pairs):
            rec.qa.append({"instruction": llava_instruction(pairs[:j], question), "answer": answer})
    return list(records.values())


def read_vqa_train(path: str | Path, image_template: str = COCO_TRAIN2014) -> list[ImageRecord]:
    """The official VQAv2 / OK-VQA training files, `QUESTIONS.json,ANNOTATIONS.json` (comma-separated: one path
    argument as every format has): one record per image, one pair per question with all its human answers."""
    parts = [p.strip() for p in str(path).split(",")]
    if len(parts) != 2 or not all(parts):
        raise DataError(f"format vqa reads two files, the questions and the annotations, given as "
                        f"QUESTIONS.json,ANNOTATIONS.json; got {str(path)!r}")
    qpath, apath = Path(parts[0]), Path(parts[1])
    qs = _need(_obj(_load_json(qpath), str(qpath), "a 'questions' list"), "questions", str(qpath), list)
    anns = _need(_obj(_load_json(apath), str(apath), "an 'annotations' list"), "annotations", str(apath), list)
    answers_of = {}
    for n, ann in enumerate(anns):
        where = f"{apath}: annotations[{n}]"
        _obj(ann, where, "'question_id' and 'answers'")
        answers = [_need(_obj(x, f"{where}: answers[{m}]", "'answer'"), "answer", f"{where}: answers[{m}]")
                   for m, x in enumerate(_need(ann, "answers", where, list))]
        # a blank one among the ten human answers is dropped, not fatal
        answers = [str(a).strip() for a in answers if str(a).strip()]
        if not answers:
            raise DataError(f"{where}: field 'answers' has no non-empty answer")
        answers_of[_need(ann, "question_id", where)] = answers
    records: "OrderedDict[str, ImageRecord]" = OrderedDict()
    for n, q in enumerate(qs):
        where = f"{qpath}: questions[{n}]"
        _obj(q, where, "'question_id', 'image_id' and 'question'")
        qid, image_id = _need(q, "question_id", where), _need(q, "image_id", where)
        question = _text(q, "question", where)
        if qid not in answers_of:
            raise DataError(f"{where}: question_id {qid} has no entry in {apath}")
        try:
            image = image_template.format(image_id=image_id)
        except (ValueError, KeyError, IndexError) as e:
            raise DataError(f"{where}: image_id {image_id!r} does not fit the image template {image_template!r} "
                            f"({type(e).__name__}: {e})") from e
        _record(records, image, image_id).qa.append({"question": question, "answers": answers_of[qid],
                                                     "question_id": qid})
    return list(records.values())


def read_gqa_train(path: Path) -> list[ImageRecord]:
    """GQA training questions (`train_balanced_questions.json`: `{question_id: {imageId, question, answer}}`),
    images `<imageId>.jpg`: one record per image, one pair per question with its one answer."""
    data = _load_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: a GQA question file is a JSON object keyed by question id, "
                        f"not a {type(data).__name__}")
    records: "OrderedDict[str, ImageRecord]" = OrderedDict()
    for qid, q in data.items():
        where = f"{path}: question {qid}"
        _obj(q, where, "'imageId', 'question' and 'answer'")
        image_id = str(_need(q, "imageId", where))
        pair = {"question": _text(q, "question", where), "answers": [_text(q, "answer", where)], "question_id": qid}
        _record(records, f"{image_id}.jpg", image_id).qa.append(pair)
    return list(records.values())


def read_vg_qa(path: Path) -> list[ImageRecord]:
    """Visual Genome QA (`question_answers.json`: `[{id, qas: [{qa_id, image_id, question, answer}]}]`), images
    `<image_id>.jpg` as the `vg` format's: one record per image, one pair per question. VG answers are sentences
    ("White."): the final period goes, as in the answers of the VQA sets it is mixed with."""
    data = _load_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: a VG QA file is a JSON list of {{id, qas}}, not a {type(data).__name__}")
    records: "OrderedDict[str, ImageRecord]" = OrderedDict()
    for i, item in enumerate(data):
        _obj(item, f"{path}: entry {i}", "'id' and 'qas'")
        for j, qa in enumerate(_need(item, "qas", f"{path}: entry {i}", list)):
            where = f"{path}: entry {i}, qas[{j}]"
            _obj(qa, where, "'question' and 'answer'")
            image_id = str(qa["image_id"] if "image_id" in qa else _need(item, "id", f"{path}: entry {i}"))
            answer = _text(qa, "answer", where).rstrip(".").strip()
            if not answer:
                raise DataError(f"{where}: field 'answer' holds no words")
            pair = {"question": _text(qa, "question", where), "answers": [answer], "question_id": qa.get("qa_id", j)}
            _record(records, f"{image_id}.jpg", image_id).qa.append(pair)
    return list(records.values())


def read_annotations(path: str | Path, fmt: str, *, llava_turns: str = "first",
                     image_template: str = COCO_TRAIN2014) -> list[ImageRecord]:
    """`llava_turns` is for `llava`, `image_template` (filled with `image_id`) for `vqa`."""
    readers = {"karpathy": read_karpathy, "vg": read_visual_genome, "jsonl": read_jsonl, "csv": read_csv,
               "coco": read_coco_captions, "instruct": read_instruct, "gqa": read_gqa_train, "vg_qa": read_vg_qa,
               "llava": lambda p: read_llava(p, llava_turns), "vqa": lambda p: read_vqa_train(p, image_template)}
    if fmt not in readers:
        raise DataError(f"unknown annotation format {fmt!r}; expected one of {FORMATS}")
    if llava_turns not in LLAVA_TURNS:
        raise DataError(f"llava turns must be one of {LLAVA_TURNS}, not {llava_turns!r}")
    return readers[fmt](path if fmt == "vqa" else Path(path))
