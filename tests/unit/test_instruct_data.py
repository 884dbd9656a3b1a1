"""Instruction data: each instruction format read, built into real tar shards and decoded back into instruction
samples; the paper's templates; the square-root mixture; every bad input one line naming file, entry and field."""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip2_train.data.annotations import ImageRecord, read_annotations
from blip2_train.data.captions import clean_caption
from blip2_train.data.decode import SampleDecoder, SkipCounter
from blip2_train.data.instruct import (CAPTION_TEMPLATES, VQA_TEMPLATES, InstructionDecoder, check_templates,
                                       mixture_weights)
from blip2_train.data.shards import SHARD_LAYOUT, build_shards, make_jpeg, shard_fingerprint, write_shard
from blip2_train.data.transforms import TrainTransform
from blip2_train.data.vqa import clean_question
from blip2_train.utils.errors import ConfigError, DataError


def write_image(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(make_jpeg(Image.new("RGB", (24, 20), (shade * 50 % 256, 90, 160))))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def raw_samples(shard_dir: Path) -> list[dict]:
    """Every sample of the shards as the webdataset reader hands it to a decoder: extension -> bytes."""
    samples = {}
    for tar_path in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key, "__url__": str(tar_path)})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def built(records, root: Path, out: Path) -> list[dict]:
    manifest = build_shards(records, root, out, shard_size=2, progress=False)
    assert manifest["num_rejected"] == 0
    return raw_samples(out)


def decoder(**kw) -> InstructionDecoder:
    return InstructionDecoder(TrainTransform(16), **kw)


def decode(sample, seed=0, **kw):
    counter = SkipCounter()
    out = decoder(**kw)(sample, random.Random(seed), counter)
    assert out is not None and counter.skipped == 0, counter.reasons
    return out


def test_instruct_lines_of_an_image_make_one_sample_holding_its_pairs(tmp_path):
    for i in range(2):
        write_image(tmp_path / f"img/{i}.jpg", i)
    ann = write_jsonl(tmp_path / "ann.jsonl", [
        {"image": "img/0.jpg", "instruction": "What colour is the sky?", "answer": "Blue.", "task": "color"},
        {"image": "img/1.jpg", "instruction": "Describe it.", "answer": "A plain card.", "image_id": "card"},
        {"image": "img/0.jpg", "instruction": "Is it day?", "answer": "Yes."},
    ])
    records = read_annotations(ann, "instruct")
    assert [(r.image, r.image_id, r.captions) for r in records] == [("img/0.jpg", "0", []), ("img/1.jpg", "card", [])]
    assert records[0].qa == [{"instruction": "What colour is the sky?", "answer": "Blue.", "task": "color"},
                             {"instruction": "Is it day?", "answer": "Yes."}]
    samples = built(records, tmp_path, tmp_path / "shards")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert (manifest["num_samples"], manifest["num_pairs"], manifest["num_captions"]) == (2, 3, 0)
    by_id = {json.loads(s["json"])["image_id"]: s for s in samples}
    assert json.loads(by_id["0"]["json"]) == {"qa": records[0].qa, "image_id": "0", "image": "img/0.jpg"}
    assert by_id["0"]["txt"] == b"Blue."
    drawn = {(d["instruction"], d["answer"], d["task"]) for d in (decode(by_id["0"], s) for s in range(30))}
    assert drawn == {("What colour is the sky?", "Blue.", "color"), ("Is it day?", "Yes.", "instruction")}
    card = decode(by_id["card"])
    assert (card["instruction"], card["answer"], card["task"]) == ("Describe it.", "A plain card.", "instruction")
    assert card["image"].shape == (3, 16, 16)


LLAVA = [{"id": "000000000007", "image": "7.jpg", "conversations": [
    {"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": "A red cup."},
    {"from": "human", "value": "Is it full?"}, {"from": "gpt", "value": "No, it is empty."},
    {"from": "human", "value": "Why?\n<image>"}, {"from": "gpt", "value": "Someone drank it."}]}]


@pytest.mark.parametrize("turns,want", [
    ("first", [("What is on the table?", "A red cup.")]),
    ("all", [("What is on the table?", "A red cup."),
             ("Question: What is on the table? Answer: A red cup. Question: Is it full? Answer:", "No, it is empty."),
             ("Question: What is on the table? Answer: A red cup. Question: Is it full? Answer: No, it is empty. "
              "Question: Why? Answer:", "Someone drank it.")]),
])
def test_llava_conversations_become_pairs_without_image_markers(tmp_path, turns, want):
    write_image(tmp_path / "7.jpg")
    (tmp_path / "llava.json").write_text(json.dumps(LLAVA))
    records = read_annotations(tmp_path / "llava.json", "llava", llava_turns=turns)
    assert len(records) == 1 and records[0].image_id == "000000000007"
    assert [(p["instruction"], p["answer"]) for p in records[0].qa] == want
    [sample] = built(records, tmp_path, tmp_path / "shards")
    drawn = {(d["instruction"], d["answer"], d["task"]) for d in (decode(sample, s) for s in range(40))}
    assert drawn == {(q, a, "instruction") for q, a in want}


def vqa_files(tmp_path: Path, answers_of_q2=("cat",) * 9 + ("dog",)) -> str:
    qs = {"questions": [{"question_id": 10, "image_id": 1, "question": "What animal is THIS?"},
                        {"question_id": 20, "image_id": 2, "question": "Which animal (on the left)?"},
                        {"question_id": 11, "image_id": 1, "question": "How many?"}]}
    anns = {"annotations": [{"question_id": 10, "answers": [{"answer": "dog"}] * 10},
                            {"question_id": 20, "answers": [{"answer": a} for a in answers_of_q2]},
                            {"question_id": 11, "answers": [{"answer": "2"}, {"answer": "two"}, {"answer": " "}]}]}
    (tmp_path / "q.json").write_text(json.dumps(qs))
    (tmp_path / "a.json").write_text(json.dumps(anns))
    return f"{tmp_path / 'q.json'},{tmp_path / 'a.json'}"


def test_vqa_training_files_one_sample_per_image_answers_drawn_by_frequency_or_among_distinct_ones(tmp_path):
    for i in (1, 2):
        write_image(tmp_path / f"train2014/COCO_train2014_{i:012d}.jpg", i)
    records = read_annotations(vqa_files(tmp_path), "vqa")
    assert [(r.image, r.image_id) for r in records] == [("train2014/COCO_train2014_000000000001.jpg", "1"),
                                                        ("train2014/COCO_train2014_000000000002.jpg", "2")]
    assert records[0].qa == [{"question": "What animal is THIS?", "answers": ["dog"] * 10, "question_id": 10},
                             {"question": "How many?", "answers": ["2", "two"], "question_id": 11}]
    samples = {json.loads(s["json"])["image_id"]: s for s in built(records, tmp_path, tmp_path / "shards")}
    question = clean_question("Which animal (on the left)?")
    assert question == "which animal on the left?"
    draws = [decode(samples["2"], seed, vqa_answers="distinct") for seed in range(400)]
    assert {d["task"] for d in draws} == {"vqa"}
    assert {d["instruction"] for d in draws} == {t.replace("{}", question) for t in VQA_TEMPLATES}
    dogs = sum(d["answer"] == "dog" for d in draws) / len(draws)
    assert 0.4 < dogs < 0.6  # the reference: uniform over {cat, dog}, not 1 in 10 as the annotators gave it
    by_frequency = [decode(samples["2"], seed)["answer"] for seed in range(400)]  # the default
    annotators = ("cat",) * 9 + ("dog",)  # vqa_files' second question
    counts = {a: annotators.count(a) / len(annotators) for a in set(annotators)}
    for a, share in counts.items():
        assert abs(by_frequency.count(a) / 400 - share) < 0.07, (a, share)
    with pytest.raises(ConfigError, match="data.vqa_answers"):
        decoder(vqa_answers="majority")
    first = {(d["instruction"], d["answer"]) for d in (decode(samples["1"], s) for s in range(200))}
    assert {a for _, a in first} == {"dog", "2", "two"}
    assert "Q: what animal is this? A:" in {i for i, _ in first}


def test_gqa_training_questions(tmp_path):
    write_image(tmp_path / "n161313.jpg")
    (tmp_path / "gqa.json").write_text(json.dumps({
        "02930152": {"imageId": "n161313", "question": "Is the sky dark?", "answer": "yes"},
        "02930160": {"imageId": "n161313", "question": "What is on the wall?", "answer": "picture"}}))
    [rec] = read_annotations(tmp_path / "gqa.json", "gqa")
    assert (rec.image, rec.image_id) == ("n161313.jpg", "n161313")
    assert rec.qa[1] == {"question": "What is on the wall?", "answers": ["picture"], "question_id": "02930160"}
    [sample] = built([rec], tmp_path, tmp_path / "shards")
    drawn = {(d["answer"], d["task"]) for d in (decode(sample, s) for s in range(30))}
    assert drawn == {("yes", "vqa"), ("picture", "vqa")}


def test_visual_genome_qa(tmp_path):
    write_image(tmp_path / "1.jpg")
    (tmp_path / "qa.json").write_text(json.dumps([
        {"id": 1, "qas": [{"qa_id": 986768, "image_id": 1, "question": "What color is the clock?", "answer": "Green."},
                          {"qa_id": 986769, "image_id": 1, "question": "Where are the people?", "answer": "Street"}]},
        {"id": 2, "qas": []}]))
    [rec] = read_annotations(tmp_path / "qa.json", "vg_qa")
    assert (rec.image, rec.image_id) == ("1.jpg", "1")
    assert rec.qa[0] == {"question": "What color is the clock?", "answers": ["Green"], "question_id": 986768}
    [sample] = built([rec], tmp_path, tmp_path / "shards")
    assert {decode(sample, s)["answer"] for s in range(30)} == {"Green", "Street"}
    (tmp_path / "bad.json").write_text(json.dumps([{"id": 3, "qas": [{"question": "Why?", "answer": "."}]}]))
    with pytest.raises(DataError, match=r"bad.json: entry 0, qas\[0\]: field 'answer' holds no words"):
        read_annotations(tmp_path / "bad.json", "vg_qa")


def test_caption_samples_get_a_caption_template_and_the_crop_sample_decoder_gives(tmp_path):
    write_image(tmp_path / "a.jpg")
    records = [ImageRecord("a.jpg", "5", ["A Dog, running!", "the dog runs"])]
    [sample] = built(records, tmp_path, tmp_path / "shards")
    plain = SampleDecoder(TrainTransform(16))
    for seed in range(20):
        d, c = decode(sample, seed), plain(sample, random.Random(seed), SkipCounter())
        assert d["task"] == "caption" and d["instruction"] in CAPTION_TEMPLATES
        assert d["answer"] == c["caption"] in {clean_caption("A Dog, running!"), "the dog runs"}
        assert torch.equal(d["image"], c["image"]) and d["image_id"] == c["image_id"] == 5


def test_draws_are_fixed_by_the_seed_and_vary_across_seeds(tmp_path):
    write_image(tmp_path / "a.jpg")
    records = [ImageRecord("a.jpg", "a", ["a dog"]),
               ImageRecord("a.jpg", "b", qa=[{"question": "What is it?", "answers": ["dog", "puppy"]}])]
    for sample in built(records, tmp_path, tmp_path / "shards"):
        one, two = decode(sample, 7), decode(sample, 7)
        assert torch.equal(one.pop("image"), two.pop("image")) and one == two
        assert len({decode(sample, s)["instruction"] for s in range(40)}) >= 5


def test_a_sample_without_usable_text_is_a_counted_skip_naming_file_and_key(tmp_path):
    jpg = make_jpeg(Image.new("RGB", (20, 20)))
    counter, warned = SkipCounter(), []
    dec = decoder()
    for meta in ({"qa": []}, {"qa": [{"question": " ", "answers": ["x"]}, {"instruction": "Hi", "answer": ""}]},
                 {"caption": ""}):
        sample = {"__key__": "000003_k", "__url__": "/data/s-000001.tar", "jpg": jpg, "json": json.dumps(meta).encode()}
        assert dec(sample, random.Random(0), counter, lambda msg, kind=None: warned.append((msg, kind))) is None
    assert counter.seen == 3 and counter.reasons == {"no instruction or answer": 3}
    assert warned[0] == ("skip 000003_k in /data/s-000001.tar: no instruction or answer", "no instruction or answer")
    assert dec({"__key__": "k", "json": b"{}"}, random.Random(0), counter) is None
    assert dec({"__key__": "k", "jpg": b"not a jpeg", "json": b'{"caption": "a"}'}, random.Random(0), counter) is None
    assert counter.reasons == {"no instruction or answer": 3, "no image": 1, "bad image": 1}


def test_paper_templates_and_bad_templates_are_one_line_naming_the_key():
    assert len(CAPTION_TEMPLATES) == 13 and len(VQA_TEMPLATES) == 10
    assert check_templates(CAPTION_TEMPLATES, slot=False, where="k") == CAPTION_TEMPLATES
    assert check_templates(list(VQA_TEMPLATES), slot=True, where="k") == VQA_TEMPLATES
    for templates, slot, says in [
        (["Question: {} or {}"], True, "template 'Question: {} or {}' needs exactly one '{}'"),
        (["Question:"], True, "template 'Question:' needs exactly one '{}'"),
        (["A photo of {}"], False, "caption template 'A photo of {}' has a '{}' slot"),
        ([], True, "the list of templates is empty"),
        ("Q: {}", True, "expected a list of templates"),
        (["ok {}", 3], True, "template 3 is not a non-empty string"),
        (["<Image>Q: {}"], True, "template '<Image>Q: {}': leave out '<Image>'"),
    ]:
        with pytest.raises(ConfigError) as e:
            check_templates(templates, slot=slot, where="data.instruct.vqa_templates")
        assert str(e.value).startswith("data.instruct.vqa_templates: ") and says in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="caption_templates: caption template 'A {}'"):
        decoder(caption_templates=["A {}"])


def test_mixture_weights_follow_the_square_root_of_sizes():
    assert mixture_weights({"a": 100, "b": 400}, {}) == pytest.approx({"a": 1 / 3, "b": 2 / 3})
    # an override replaces the set's square root (10 here) before normalising
    assert mixture_weights({"a": 100, "b": 400}, {"a": 20.0, "b": None}) == pytest.approx({"a": 0.5, "b": 0.5})
    w = mixture_weights({"a": 9, "b": None, "c": 0}, {"b": 1.0})
    assert w == pytest.approx({"a": 0.75, "b": 0.25, "c": 0.0}) and sum(w.values()) == pytest.approx(1.0)
    for sizes, overrides, says in [({"llava": None, "vqa": 4}, {}, "set 'llava': no manifest.json: give its weight"),
                                   ({"a": 4}, {"b": 1.0}, "weight given for ['b']"),
                                   ({"a": 4}, {"a": -1.0}, "set 'a': weight must be a number >= 0"),
                                   ({"a": 0}, {}, "sum to 0")]:
        with pytest.raises(ConfigError) as e:
            mixture_weights(sizes, overrides)
        assert says in str(e.value)


def old_caption_fingerprint(records: list[dict], max_pixels: int) -> str:
    """The fingerprint formula of caption shards from before records had pairs."""
    h = hashlib.sha256(json.dumps({"layout": SHARD_LAYOUT, "max_pixels": int(max_pixels)}).encode())
    for r in records:
        h.update(json.dumps([r["image"], r["image_id"], list(r["captions"])], ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()[:32]


def test_caption_fingerprints_are_unchanged_and_pairs_enter_those_of_pair_records(tmp_path):
    captions = [asdict(ImageRecord(f"{i}.jpg", str(i), ["a cat", "ein Kätzchen"][: i % 2 + 1])) for i in range(4)]
    assert shard_fingerprint(captions, 1000) == old_caption_fingerprint(captions, 1000)
    pairs = [asdict(ImageRecord("0.jpg", "0", qa=[{"instruction": "Hi?", "answer": "Hello."}]))]
    other = [asdict(ImageRecord("0.jpg", "0", qa=[{"instruction": "Hi?", "answer": "Bye."}]))]
    assert shard_fingerprint(pairs, 1000) != shard_fingerprint(other, 1000)
    assert shard_fingerprint(pairs, 1000) != old_caption_fingerprint(pairs, 1000)


def test_write_shard_rejects_a_record_with_neither_captions_nor_usable_pairs(tmp_path):
    write_image(tmp_path / "a.jpg")
    recs = [asdict(ImageRecord("a.jpg", "1")), asdict(ImageRecord("a.jpg", "2", qa=[{"question": "", "answers": []}])),
            asdict(ImageRecord("a.jpg", "3", qa=[{"question": "Why?", "answers": ["", "because"]}]))]
    entry = write_shard(recs, str(tmp_path), str(tmp_path / "s.tar"))
    assert [(r["image_id"], r["reason"]) for r in entry["rejects"]] == [
        ("1", "no non-empty caption"), ("2", "no usable question/answer pair")]
    [sample] = raw_samples(tmp_path)
    assert sample["txt"] == b"because" and json.loads(sample["json"])["image_id"] == "3"


BAD = [
    ("instruct", "ann.jsonl", ['{"image": "a.jpg", "instruction": "Hi", "answer": "Yo"}',
                               '{"image": "a.jpg", "instruction": "Hi"}'], {}, "ann.jsonl:2: missing field 'answer'"),
    ("instruct", "ann.jsonl", ['{"image": "a.jpg", "instruction": "  ", "answer": "Yo"}'], {},
     "ann.jsonl:1: field 'instruction' is empty"),
    ("instruct", "ann.jsonl", ['{"image": "a.jpg", "instruction": "Hi", "answer": 3}'], {},
     "ann.jsonl:1: field 'answer' must be of type str, not int"),
    ("llava", "l.json", [{"image": "a.jpg", "conversations": []}], {},
     "l.json: entry 0: field 'conversations' must be a non-empty list"),
    ("llava", "l.json", [LLAVA[0], {"conversations": LLAVA[0]["conversations"]}], {},
     "l.json: entry 1: missing field 'image'"),
    ("llava", "l.json", [{"image": "a.jpg", "conversations": [{"from": "gpt", "value": "Hi"}]}], {},
     "l.json: entry 0: conversations[0]: field 'from' is 'gpt', expected 'human'"),
    ("llava", "l.json", [{"image": "a.jpg", "conversations": [{"from": "human", "value": "Hi"}] * 2}], {},
     "l.json: entry 0: conversations[1]: field 'from' is 'human', expected 'gpt'"),
    ("llava", "l.json", [{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nHi"}]}], {},
     "l.json: entry 0: conversations[0]: a 'human' turn without a following 'gpt' turn"),
    ("llava", "l.json", [{"image": "a.jpg", "conversations": LLAVA[0]["conversations"][:3]}],
     {"llava_turns": "all"}, "l.json: entry 0: conversations[2]: a 'human' turn without a following 'gpt' turn"),
    ("llava", "l.json", [{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>"},
                                                              {"from": "gpt", "value": "x"}]}], {},
     "l.json: entry 0: conversations[0]: field 'value' is empty"),
    ("gqa", "g.json", {"q1": {"imageId": "n1", "question": "Why?"}}, {}, "g.json: question q1: missing field 'answer'"),
]


@pytest.mark.parametrize("fmt,name,content,options,says", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_instruction_annotations_are_one_line_naming_file_entry_and_field(tmp_path, fmt, name, content, options,
                                                                               says):
    path = tmp_path / name
    if fmt == "instruct":
        write_jsonl(path, content)
    else:
        path.write_text(json.dumps(content))
    with pytest.raises(DataError) as e:
        read_annotations(path, fmt, **options)
    assert str(e.value).startswith(f"{tmp_path}/{says}") and "\n" not in str(e.value), str(e.value)


def test_bad_vqa_training_files_name_the_question_and_field(tmp_path):
    ann = vqa_files(tmp_path)
    with pytest.raises(DataError, match="format vqa reads two files"):
        read_annotations(str(tmp_path / "q.json"), "vqa")
    anns = json.loads((tmp_path / "a.json").read_text())
    (tmp_path / "a.json").write_text(json.dumps({"annotations": anns["annotations"][:2]}))
    with pytest.raises(DataError) as e:
        read_annotations(ann, "vqa")
    assert str(e.value) == f"{tmp_path}/q.json: questions[2]: question_id 11 has no entry in {tmp_path}/a.json"
    anns["annotations"][1] = {"question_id": 20}
    (tmp_path / "a.json").write_text(json.dumps(anns))
    with pytest.raises(DataError, match=r"a.json: annotations\[1\]: missing field 'answers'$"):
        read_annotations(ann, "vqa")
    vqa_files(tmp_path)
    with pytest.raises(DataError, match=r"q.json: questions\[0\]: image_id 1 does not fit the image template"):
        read_annotations(ann, "vqa", image_template="{image_id:s}.jpg")
