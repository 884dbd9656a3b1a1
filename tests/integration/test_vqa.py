"""Zero-shot VQA: the official normalisation and accuracy against hand-computed cases, the official file formats,
`blip2-eval experiment=vqa_*_eval` on tiny models (1 and 2 processes), and `blip2-generate` / the Python API giving
the same texts as `blip2-eval` for the same images."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blip2_train.eval.metrics import vqa
from helpers.procs import REPO, clean_env

# -- normalisation and accuracy: hand-computed -------------------------------------------------------------------


@pytest.mark.parametrize("raw, norm", [
    ("Two dogs.", "2 dogs"),            # number word -> digit, final period dropped, lower case
    ("The cat", "cat"),                 # article dropped
    ("an apple", "apple"),
    ("isnt", "isn't"),                  # contraction restored
    ("black-and-white", "black and white"),  # a mark not touching a space becomes a space
    ("yes, it is", "yes it is"),        # a mark touching a space is deleted
    ("3.5", "3.5"),                     # a decimal point stays
    ("1,000", "1000"),                  # digit,digit: every mark deleted
    ("  Yes!\n", "yes"),
])
def test_answer_normalisation(raw, norm):
    assert vqa.normalize_answer(raw) == norm


def humans(matching: int, answer: str = "red", other: str = "blue") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


@pytest.mark.parametrize("matching, expected", [
    (10, 1.0),
    (4, 1.0),   # every leave-one-out subset keeps >= 3 matches
    # 3 subsets leave out a match (2 left: 2/3), 7 keep all 3 (1): (3 * 2/3 + 7) / 10
    (3, 0.9),
    # 2 subsets leave one of the 2 matches out (1/3), 8 keep both (2/3): (2/3 + 16/3) / 10
    (2, 0.6),
    (1, 0.3),   # 9 subsets keep the one match (1/3), one loses it (0)
    (0, 0.0),
])
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(matching, expected):
    assert vqa.vqa_accuracy("red", humans(matching)) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_the_prediction_and_disagreeing_humans_only():
    assert vqa.vqa_accuracy("Two.", humans(3, "2", "3")) == pytest.approx(0.9)
    # humans disagree: their punctuation step runs before comparing ("yes." == "yes")
    assert vqa.vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
    # unanimous humans are compared as written (both rules): "Yes." never equals the normalised "yes"
    assert vqa.vqa_accuracy("yes", ["Yes."] * 10) == 0.0
    with pytest.raises(ValueError):
        vqa.vqa_accuracy("yes", [])


def test_scores_per_type_and_exact_match():
    m, per = vqa.score_answers(["red", "2", "no"], [humans(10), humans(2, "2", "3"), humans(0, "yes", "no")],
                               question_types=["what color", "how many", "is there"],
                               answer_types=["other", "number", "yes/no"])
    assert per == pytest.approx([1.0, 0.6, 1.0])
    assert m["accuracy"] == pytest.approx(100 * 2.6 / 3)
    assert m["answer_type/number"] == pytest.approx(60.0) and m["question_type/is there"] == pytest.approx(100.0)
    g, per = vqa.score_answers(["The Table.", "chair"], [["table"], ["bed"]], metric="exact_match")
    assert per == [1.0, 0.0] and g["accuracy"] == pytest.approx(50.0)


# -- the official files ------------------------------------------------------------------------------------------


def test_bad_vqa_files_are_one_line_naming_the_question(tmp_path):
    from blip2_train.data.vqa import read_vqa
    from blip2_train.utils.errors import DataError

    q = tmp_path / "q.json"
    a = tmp_path / "a.json"
    q.write_text(json.dumps({"questions": [{"question_id": 7, "image_id": 1, "question": "What?"}]}))
    a.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="question_id 7 has no entry"):
        read_vqa(q, a, tmp_path)
    a.write_text(json.dumps({"annotations": [{"question_id": 7, "answers": [{"answer": "x"}]}]}))
    q.write_text(json.dumps({"questions": [{"question_id": 7, "image_id": "abc", "question": "What?"}]}))
    with pytest.raises(DataError, match="image_id 'abc' does not fit"):
        read_vqa(q, a, tmp_path)
    q.write_text(json.dumps({"questions": [{"question_id": 7, "image_id": 3}]}))
    with pytest.raises(DataError, match=r"questions\[0\]: missing field 'question'"):
        read_vqa(q, a, tmp_path)


# -- through the commands ----------------------------------------------------------------------------------------


def cli(module: str, *args, nproc: int = 1, port: int = 29731) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"blip2_train.cli.{module}", *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}",
               *cmd[1:]]
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def vqa_world(synth, tiny_llms, tmp_path_factory):
    """The synthetic VQA sets (vqav2/, okvqa/, gqa/ of the data dir) and a stage-2 export of the tiny arch
    (Q-Former untrained: what matters here is that every path gives the same text for the same input)."""
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from blip2_train.config.compose import compose
    from blip2_train.demo.world_vqa import GQA_FILE, VQA_FILES
    from blip2_train.models.export import export_stage2
    from blip2_train.models.llm import load_llm_tokenizer

    d = Path(synth["dir"])  # conftest's synth writes the VQA sets as make_synthetic.py does
    sets = {k: d / k / "annotations" / f for k, f in
            (("vqav2", VQA_FILES["vqav2"][0]), ("okvqa", VQA_FILES["okvqa"][0]), ("gqa", GQA_FILE))}
    cfg = compose("eval", ["experiment=caption_coco_eval", "preset=tiny", f"paths.data_dir={synth['dir']}",
                           f"paths.llm_dir={tiny_llms['opt']}", "paths.stage2_checkpoint=null"])
    with open_dict(cfg):
        cfg.model.stage2_checkpoint = None
    model = instantiate(cfg.model)
    out = tmp_path_factory.mktemp("vqa_export")
    export_stage2(model, load_llm_tokenizer(tiny_llms["opt"]), out, image_size=32, prompt="a photo of")
    return {"export": out, "sets": sets}


def tiny_eval(synth, export, out, *extra) -> list[str]:
    return ["preset=tiny", f"paths.data_dir={synth['dir']}", "data.num_workers=0", f"paths.stage2_checkpoint={export}",
            "data.eval_set.limit=10", "data.eval_batch_size=4", f"paths.output_dir={out}", *extra]


def test_synthetic_vqa_set_is_in_the_official_format(vqa_world, synth):
    from blip2_train.data.vqa import read_gqa, read_vqa

    d = Path(synth["dir"])
    v = read_vqa(vqa_world["sets"]["vqav2"], d / "vqav2/annotations/v2_mscoco_val2014_annotations.json",
                 d / "vqav2/images")
    assert len(v) == 3 * 24 and all(len(a) == 10 for a in v.answers)
    assert {"how many", "what shape is", "where is the", "is there a"} & set(v.question_types)
    assert all(Path(p).exists() for p in v.images)  # COCO-named links to the synthetic images
    g = read_gqa(vqa_world["sets"]["gqa"], d / "gqa/images")
    assert g.questions == v.questions and [a[0] for a in g.answers] == [max(set(a), key=a.count) for a in v.answers]


def test_vqa_experiment_runs_and_scores_its_predictions(vqa_world, synth, tmp_path):
    """(All three VQA experiments run on 1 and 2 processes in tests/integration/test_experiments.py's matrix.)"""
    name = "vqa_vqav2_eval"
    extra = ["eval.image_blind_baseline=true"] if name == "vqa_vqav2_eval" else []
    r = cli("evaluate", f"experiment={name}", *tiny_eval(synth, vqa_world["export"], tmp_path, *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    preds = json.loads((tmp_path / "vqa_predictions.json").read_text())
    assert m["num_questions"] == 10 and len(preds) == 10 and all(p["answer"] for p in preds)
    assert m["accuracy"] == pytest.approx(100 * sum(p["accuracy"] for p in preds) / 10)
    assert any(k.startswith("question_type/") for k in m) and any(k.startswith("answer_type/") for k in m)
    assert preds[0]["question"].endswith("?") and not preds[0]["answer"].startswith("Question")
    if name == "vqa_vqav2_eval":
        assert "blind/accuracy" in m and (tmp_path / "vqa_predictions_blind.json").exists()


def test_vqa_needs_a_question_template_and_a_question_set(vqa_world, synth, tmp_path):
    r = cli("evaluate", "experiment=vqa_vqav2_eval", *tiny_eval(synth, vqa_world["export"], tmp_path / "a"),
            "model.text.prompt=what is it")
    assert r.returncode == 2 and "model.text.prompt must hold the question's place" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("evaluate", "experiment=caption_coco_eval", *tiny_eval(synth, vqa_world["export"], tmp_path / "b"),
            "eval.kind=vqa")
    assert r.returncode == 2 and "eval.kind=vqa does not fit" in r.stderr


def test_vqa_metrics_hold_both_rules_and_the_submission(vqa_world, synth, tmp_path):
    """eval.vqa_metric=official: the headline is the official rule's, both rules' figures are those of the answers
    in vqa_predictions.json, and vqa_submission.json holds the same answers normalised (tests/unit/
    test_vqa_scorers.py has the hand-computed cases that separate the rules)."""
    from blip2_train.data.vqa import read_vqa

    r = cli("evaluate", "experiment=vqa_vqav2_eval",
            *tiny_eval(synth, vqa_world["export"], tmp_path, "eval.vqa_metric=official"))
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    preds = json.loads((tmp_path / "vqa_predictions.json").read_text())
    d = Path(synth["dir"])
    v = read_vqa(vqa_world["sets"]["vqav2"], d / "vqav2/annotations/v2_mscoco_val2014_annotations.json",
                 d / "vqav2/images", limit=10)
    assert [p["question_id"] for p in preds] == v.question_ids and m["num_scored"] == 10
    for rule in vqa.VQA_METRICS:
        per = [vqa.vqa_accuracy(p["answer"], h, rule) for p, h in zip(preds, v.answers)]
        assert m[f"accuracy_{rule}"] == pytest.approx(100 * sum(per) / 10), rule
    assert m["accuracy"] == m["accuracy_official"] == pytest.approx(100 * sum(p["accuracy"] for p in preds) / 10)
    sub = json.loads((tmp_path / "vqa_submission.json").read_text())
    assert sub == [{"question_id": p["question_id"], "answer": vqa.normalize_answer(p["answer"])} for p in preds]
    assert all(isinstance(s["question_id"], int) and isinstance(s["answer"], str) for s in sub)


def test_vqa_without_human_answers_writes_the_submission(vqa_world, synth, tmp_path):
    """A question file alone (test-dev's has no answers): every question answered, the submission written, no
    accuracy in metrics.json (the blind baseline included) and no error."""
    r = cli("evaluate", "experiment=vqa_vqav2_eval", *tiny_eval(synth, vqa_world["export"], tmp_path,
                                                                "data.eval_set.annotations=null",
                                                                "eval.image_blind_baseline=true"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy is not available" in r.stderr + r.stdout
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["num_questions"] == 10 and m["num_scored"] == 0
    assert not any("accuracy" in k or k.startswith(("question_type/", "answer_type/")) for k in m)
    preds = json.loads((tmp_path / "vqa_predictions.json").read_text())
    sub = json.loads((tmp_path / "vqa_submission.json").read_text())
    assert len(sub) == 10 and [s["question_id"] for s in sub] == [p["question_id"] for p in preds]
    assert [s["answer"] for s in sub] == [vqa.normalize_answer(p["answer"]) for p in preds]


def test_generate_and_api_equal_blip2_eval(vqa_world, synth, tmp_path):
    """The VQA answers and the captions of blip2-eval, again from blip2-generate and from blip2_train.load."""
    import blip2_train
    from blip2_train.data.vqa import read_vqa

    export = vqa_world["export"]
    r = cli("evaluate", "experiment=vqa_vqav2_eval", *tiny_eval(synth, export, tmp_path / "vqa"))
    assert r.returncode == 0, r.stderr[-3000:]
    preds = json.loads((tmp_path / "vqa" / "vqa_predictions.json").read_text())
    d = Path(synth["dir"])
    v = read_vqa(vqa_world["sets"]["vqav2"], d / "vqav2/annotations/v2_mscoco_val2014_annotations.json",
                 d / "vqav2/images", limit=10)
    qfile = tmp_path / "questions.jsonl"
    qfile.write_text("".join(json.dumps({"image": i, "question": q}) + "\n" for i, q in zip(v.images, v.questions)))
    g = cli("generate", export, "--questions", qfile, "--out", tmp_path / "answers.jsonl", "--batch-size", 3)
    assert g.returncode == 0, g.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == [p["answer"] for p in preds]

    r = cli("evaluate", "experiment=caption_coco_eval", *tiny_eval(synth, export, tmp_path / "cap"),
            "data.eval_set.limit=5")
    assert r.returncode == 0, r.stderr[-3000:]
    caps = [p["caption"] for p in json.loads((tmp_path / "cap" / "captions_predictions.json").read_text())]
    entries = json.loads((d / "coco/annotations/coco_karpathy_test.json").read_text())[:5]
    images = [str(synth["root"] / e["image"]) for e in entries]
    # blip2-eval decodes with the eval protocol's settings (preset=tiny: beam 3, 3-40 new tokens): the same here
    dec = ["--num-beams", 3, "--max-new-tokens", 40, "--min-new-tokens", 3]
    g = cli("generate", export, *images[:2], Path(images[2]).parent, "--out", tmp_path / "caps.jsonl", *dec)
    assert g.returncode == 0, g.stderr[-3000:]
    got = {x["image"]: x["text"] for x in map(json.loads, (tmp_path / "caps.jsonl").read_text().splitlines())}
    assert [got[i] for i in images] == caps and all(x == "a photo of" for x in
                                                     [json.loads(l)["prompt"] for l in
                                                      (tmp_path / "caps.jsonl").read_text().splitlines()])

    m = blip2_train.load(export, device="cpu")
    assert m.answer(v.images, v.questions) == [p["answer"] for p in preds]
    assert m.caption(images, num_beams=3, max_new_tokens=40, min_new_tokens=3) == caps


def test_generate_bad_input_is_one_line(vqa_world, tmp_path):
    r = cli("generate", vqa_world["export"], tmp_path / "nope.jpg")
    assert r.returncode == 2 and "input not found" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"image": "a.jpg"}\n')
    r = cli("generate", vqa_world["export"], "--questions", bad)
    assert r.returncode == 2 and f"{bad}:1: expected a JSON object" in r.stderr
    r = cli("generate", vqa_world["export"], tmp_path, "--prompt", "Question: {} Answer:")
    assert r.returncode == 2 and "is a question template: give --question" in r.stderr


def test_demo_vqa_step_writes_what_the_summary_reads(vqa_world, synth, tmp_path):
    """run_scripts/demo_vqa.sh as make demo calls it (on a data dir made before the VQA sets existed: it writes
    them), then the summary's VQA function on its output."""
    import shutil

    data = tmp_path / "data"
    (data / "synthetic").mkdir(parents=True)
    for part in ("coco", "bert"):  # the rest of the world, without vqav2/
        (data / "synthetic" / part).symlink_to(Path(synth["dir"]) / part)
    out = tmp_path / "demo"
    out.mkdir()
    shutil.copytree(vqa_world["export"], out / "export_stage2")
    r = subprocess.run(["bash", "run_scripts/demo_vqa.sh", str(out)], cwd=REPO, capture_output=True, text=True,
                       env=clean_env(PY=sys.executable, BLIP2_DATA_DIR=str(data)), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (data / "synthetic" / "vqav2" / "annotations" / "v2_mscoco_val2014_annotations.json").exists()
    m = json.loads((out / "eval_vqa" / "metrics.json").read_text())
    assert m["num_questions"] == 3 * 24 and "blind/accuracy" in m
    # the summary's function, read from the script (which runs the whole summary when executed)
    src = (REPO / "run_scripts" / "demo_summary.py").read_text()
    fn = src[src.index("def vqa_results"):src.index("\n\n\nvqa, vqa_rows")]
    ns: dict = {"Path": Path, "json": json}
    exec(fn, ns)  # noqa: S102 - our own script's function
    vqa_metrics, rows, bars = ns["vqa_results"](out)
    assert vqa_metrics == m and rows[0][1:3] == (m["accuracy"], m["blind/accuracy"])
    key = "zero-shot VQA accuracy >= 1.1x the image-blind baseline and 5 points above it"
    assert bars == {key: m["accuracy"] >= max(1.1 * m["blind/accuracy"], m["blind/accuracy"] + 5.0)}
    for acc, blind, ok in ((2.5, 0.0, False), (6.0, 0.0, True), (56.2, 39.5, True), (43.0, 39.5, False)):
        collapsed = tmp_path / f"c{acc}" / "eval_vqa"  # a ratio alone passed a collapsed model (2.5 vs blind 0)
        collapsed.mkdir(parents=True)
        (collapsed / "metrics.json").write_text(json.dumps({"accuracy": acc, "blind/accuracy": blind}))
        assert ns["vqa_results"](collapsed.parent)[2] == {key: ok}, (acc, blind)
    assert ns["vqa_results"](tmp_path)[2] == {"zero-shot VQA was evaluated (run_scripts/demo_vqa.sh)": False}


def test_nocaps_script_writes_the_layout_nocaps_eval_reads(tmp_path):
    """data_scripts/download_nocaps.sh offline: a local copy of the official annotation file, DRY_RUN (no
    downloads): the file lands where conf/data/nocaps_eval.yaml reads it, the image list names every missing
    image, and a malformed file is one line."""
    from blip2_train.data.annotations import read_annotations

    script = REPO / "data_scripts" / "download_nocaps.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    ann = {"images": [{"id": i, "file_name": f"{i:016x}.jpg", "domain": d,
                       "coco_url": f"https://s3.amazonaws.com/nocaps/val/{i:016x}.jpg"}
                      for i, d in enumerate(["in-domain", "near-domain", "out-domain"])],
           "annotations": [{"image_id": i, "id": 10 * i + k, "caption": f"caption {k} of {i}"}
                           for i in range(3) for k in range(2)]}
    local = tmp_path / "official.json"
    local.write_text(json.dumps(ann))
    dest = tmp_path / "data" / "nocaps"
    (dest / "images").mkdir(parents=True)
    (dest / "images" / f"{1:016x}.jpg").write_bytes(b"present")
    env = clean_env(PY=sys.executable, NOCAPS_ANNOTATION=str(local), DRY_RUN="1")
    r = subprocess.run(["bash", str(script), str(dest)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "3 images, 6 captions; 2 image(s) to fetch" in r.stdout
    urls = [line.split("\t") for line in (dest / "image_urls.tsv").read_text().splitlines()]
    assert [u for u, _ in urls] == [ann["images"][0]["coco_url"], ann["images"][2]["coco_url"]]
    assert [p for _, p in urls] == [str(dest / "images" / ann["images"][i]["file_name"]) for i in (0, 2)]
    recs = read_annotations(dest / "annotations" / "nocaps_val_4500_captions.json", "coco")
    assert [r.domain for r in recs] == ["in-domain", "near-domain", "out-domain"] and len(recs[0].captions) == 2
    del ann["images"][1]["domain"]
    local.write_text(json.dumps(ann))
    r = subprocess.run(["bash", str(script), str(dest)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "images[1] has no 'domain'" in r.stderr and "Traceback" not in r.stderr


def test_api_scores_are_the_retrieval_evaluations(stage1_export, synth):
    """`score(head="itc")` is the retrieval evaluation's ITC similarity of each pair, `head="itm"` its ITM match
    logit: computed here with the evaluation's own functions on the evaluation's image pipeline."""
    from torch.utils.data import DataLoader

    import blip2_train
    from blip2_train.data.eval_sets import CaptionedImages, EvalImageDataset, collate_eval_images
    from blip2_train.eval.metrics.retrieval import itc_similarity
    from blip2_train.eval.retrieval import encode_images, encode_texts

    data = CaptionedImages.from_karpathy(synth["ann"]["test"], synth["root"], limit=4)
    texts = [data.texts[data.img2txt[i][0]] for i in range(4)]
    s = blip2_train.load(stage1_export, device="cpu")
    itc, itm = s.score(data.images, texts, head="itc"), s.score(data.images, texts, head="itm")
    loader = DataLoader(EvalImageDataset(data, 32), batch_size=2, collate_fn=collate_eval_images)
    embeds, feats = encode_images(s.model, loader, s.device)
    tok = s.tokenizer(texts, padding="longest", truncation=True, max_length=35, return_tensors="pt")
    sim = itc_similarity(feats, encode_texts(s.model, tok["input_ids"], tok["attention_mask"], s.device))
    assert itc == pytest.approx(sim.diagonal().tolist(), abs=1e-6)
    logits = s.model.itm_forward(embeds.float(), tok["input_ids"], tok["attention_mask"])[:, 1]
    assert itm == pytest.approx(logits.tolist(), abs=1e-5)
    with pytest.raises(ValueError, match="head must be"):
        s.score(data.images, texts, head="lm")
