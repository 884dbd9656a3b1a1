"""The demo's synthetic world and its stand-ins, as `make demo` runs them: the world's scenes and
report (`data_scripts/make_synthetic.py`), the ViT stand-in (`data_scripts/pretrain_demo_vit.py`) that stage 1
loads with `paths.vision_checkpoint`, and the held-out ITM / LM check of a stage-1 export
(`run_scripts/demo_stage1_check.py`, through plain transformers)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter

import pytest
import torch

from helpers.tiny import REPO


def test_world_scenes_identify_their_images_and_the_report_counts_duplicates(tmp_path):
    from blip2_train.demo.world import COLORS, content_key, make_synthetic, world_report

    paths = make_synthetic(tmp_path, num_train=60, num_val=4, num_test=40, seed=3, image_size=32)
    scenes = json.loads(paths["scenes"].read_text())
    assert len(scenes) == 104 and {len(s["objects"]) for s in scenes} == {1, 2}
    rich = make_synthetic(tmp_path / "rich", num_train=20, num_val=2, num_test=20, seed=3, image_size=32,
                          min_objects=2, max_objects=3)
    assert {len(s["objects"]) for s in json.loads(rich["scenes"].read_text())} == {2, 3}
    # world 1 draws from the first six colours of the palette; the demo's world (num_colors=10) from ten
    assert {o["color"] for s in scenes for o in s["objects"]} <= set(list(COLORS)[:6])
    ten = make_synthetic(tmp_path / "ten", num_train=60, num_val=2, num_test=40, seed=3, image_size=32,
                         min_objects=1, max_objects=3, num_colors=10)
    ten_scenes = json.loads(ten["scenes"].read_text())
    assert {o["color"] for s in ten_scenes for o in s["objects"]} == set(list(COLORS)[:10])
    assert {len(s["objects"]) for s in ten_scenes} == {1, 2, 3}
    for bad in (1, len(COLORS) + 1):
        with pytest.raises(ValueError, match="num_colors"):
            make_synthetic(tmp_path / f"bad{bad}", num_train=2, num_val=1, num_test=1, num_colors=bad)
    test = json.loads(paths["test"].read_text())
    by_image = {s["image"]: s for s in scenes}
    for e in test:  # every caption names every object's colour, shape and quadrant
        for cap in e["caption"]:
            for o in by_image[e["image"]]["objects"]:
                assert o["color"] in cap and o["shape"] in cap, (cap, o)
    r = world_report(paths["scenes"])
    keys = Counter(content_key(s) for s in scenes if s["split"] == "test")
    assert r["test"]["images"] == 40 and r["test"]["contents"] == len(keys)
    assert r["test"]["duplicate_content_rate"] == sum(c for c in keys.values() if c > 1) / 40
    assert r["test"]["chance_text_to_image_r1"] == 2.5
    r = subprocess.run([sys.executable, "data_scripts/make_synthetic.py", "--out", str(tmp_path / "w"),
                        "--num-train", "30", "--num-val", "3", "--num-test", "20"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "test: 20 images," in r.stdout and "--out" not in r.stderr and "duplicate-content rate" in r.stdout and "chance text->image R@1 5.00%" \
        in r.stdout
    # world.json names the world, as run_scripts/prepare_synthetic.sh compares it before keeping a data dir
    world = json.loads((tmp_path / "w" / "world.json").read_text())
    assert world["world"] == {"num_colors": 6, "min_objects": 1, "max_objects": 2}
    assert world["splits"]["test"]["images"] == 20
    r = subprocess.run([sys.executable, "data_scripts/make_synthetic.py", "--out", str(tmp_path / "w11"),
                        "--num-colors", "11"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--num-colors" in r.stderr


def test_vit_stand_in_script_writes_what_preset_tiny_loads(synth, tmp_path):
    """The script trains on the train scenes and saves a vision tower; preset=tiny's stage 1 with
    paths.vision_checkpoint=<data_dir>/vit starts from exactly those weights, frozen."""
    from hydra.utils import instantiate
    from safetensors.torch import load_file

    from blip2_train.config.compose import compose

    out = tmp_path / "vit"
    r = subprocess.run([sys.executable, "data_scripts/pretrain_demo_vit.py", "--data-dir", str(synth["dir"]),
                        "--out", str(out), "--steps", "3", "--batch-size", "8"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DEMO STAND-IN for a pretrained ViT" in r.stdout
    report = json.loads((out / "pretrain.json").read_text())
    assert report["steps"] == 3 and 0.0 <= report["patch_color_accuracy"] <= 1.0
    assert 0.0 <= report["patch_cell_accuracy"] <= 1.0 and "cell" in r.stdout
    cfg = compose("train", ["experiment=stage1_pretrain", "preset=tiny", f"paths.data_dir={synth['dir']}",
                            f"paths.vision_checkpoint={out}"])
    model = instantiate(cfg.model)
    saved = load_file(str(out / "model.safetensors"))
    vm = model.hf.vision_model.state_dict()
    blocks = [k for k in saved if not k.startswith("vision_model.post_layernorm")]
    assert blocks and all(torch.equal(vm[k[len("vision_model."):]], saved[k]) for k in blocks)
    assert not any(p.requires_grad for p in model.hf.vision_model.encoder.parameters())


def test_stage1_check_scores_an_export_through_plain_transformers(stage1_export, synth, tmp_path):
    """run_scripts/demo_stage1_check.py on a stage-1 export: one true, one random and one hardest other caption
    per held-out image; the LM loss with the image and with a blank one."""
    out = tmp_path / "check.json"
    # the evaluation's protocol from blip2-eval's overrides, as make demo passes them
    r = subprocess.run([sys.executable, "run_scripts/demo_stage1_check.py", str(stage1_export), str(synth["dir"]),
                        str(out), "preset=tiny", "eval.k_test=5", "eval.rerank_score=product"],
                       cwd=REPO, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    c = json.loads(out.read_text())
    assert c["pairs"] == 24 and c["rerank_score"] == "product"
    for k in ("itm_true_over_random", "itm_true_over_hard"):
        assert 0.0 <= c[k] <= 1.0 and abs(c[k] * 24 - round(c[k] * 24)) < 1e-4  # a share of the 24 pairs
    for k in ("itm_match_prob_true", "itm_match_prob_random", "itm_match_prob_hard"):
        assert 0.0 < c[k] < 1.0
    assert math.isfinite(c["qformer_lm_loss_heldout"]) and c["qformer_lm_loss_heldout"] > 0
    assert c["itm_text_offset_std"] > 0 and c["itm_true_log_odds_std"] > 0
    assert math.isfinite(c["itm_true_log_odds_mean"]) and math.isfinite(c["itm_other_log_odds_mean"])
    assert c["qformer_lm_loss_heldout"] != c["qformer_lm_loss_heldout_blank_image"]  # the image is an input
    # re-ranking's image->text changes: counts of the 24 images, each broken one of exactly one kind
    kinds = ("same_content", "position", "count", "objects")
    assert 0 <= c["itm_rerank_i2t_fixed"] <= 24 and 0 <= c["itm_rerank_i2t_broken"] <= 24
    assert sum(c[f"itm_rerank_i2t_broken_by_{k}"] for k in kinds) == c["itm_rerank_i2t_broken"]
    # ... and they are the evaluation's: fixed - broken = the change of its image->text R@1 under that protocol
    from torch.utils.data import DataLoader

    from blip2_train.api import load
    from blip2_train.data.eval_sets import CaptionedImages, EvalImageDataset, collate_eval_images
    from blip2_train.eval.retrieval import evaluate_retrieval

    scorer = load(stage1_export, device="cpu")
    data = CaptionedImages.from_karpathy(synth["ann"]["test"], synth["root"])
    loader = DataLoader(EvalImageDataset(data, 32), batch_size=8, collate_fn=collate_eval_images)
    m = evaluate_retrieval(scorer.model, data, loader, scorer.tokenizer, (0, len(data)), k_test=5,
                           rerank_score="product")
    net = c["itm_rerank_i2t_fixed"] - c["itm_rerank_i2t_broken"]
    assert net == round((m["txt_r1"] - m["itc_only/txt_r1"]) * 24 / 100)


def test_stage1_check_names_what_a_scene_change_is():
    """demo_stage1_check.difference: what another scene changes of one, in the order the check reports them."""
    sys.path.insert(0, str(REPO / "run_scripts"))
    try:
        from demo_stage1_check import difference
    finally:
        sys.path.pop(0)

    def scene(*objs):
        return {"objects": [{"color": c, "shape": s, "row": r, "col": k} for c, s, r, k in objs]}

    a = scene(("red", "circle", 0, 0), ("blue", "square", 1, 1))
    assert difference(a, scene(("blue", "square", 1, 1), ("red", "circle", 0, 0))) == "same content"
    assert difference(a, scene(("red", "circle", 1, 1), ("blue", "square", 0, 0))) == "position"
    assert difference(a, scene(("red", "circle", 0, 0))) == "count"
    assert difference(a, scene(("red", "square", 0, 0), ("blue", "square", 1, 1))) == "objects"


def test_demo_llm_reads_the_scene_description_when_asked(synth, tmp_path):
    """train_demo_llm.py --caption-context description: every caption follows its own scene's description
    (objects in a random order), the LM trains and saves; without the scenes it is one usage error."""
    sys.path.insert(0, str(REPO / "data_scripts"))
    try:
        from train_demo_llm import described_captions
    finally:
        sys.path.pop(0)
    from blip2_train.data.annotations import read_annotations
    from blip2_train.demo.world import COLORS, SHAPES

    def named(text: str) -> list[str]:  # every "colour shape" the text names, with repeats
        return sorted(f"{c} {s}" for c in COLORS for s in SHAPES for _ in range(text.count(f"{c} {s}")))

    records = read_annotations(synth["ann"]["train"], "karpathy")
    pairs = described_captions(str(synth["dir"]), records)
    assert len(pairs) == sum(len(r.captions) for r in records)
    orders = set()
    for context, caption in pairs:  # the description names exactly the caption's objects
        assert named(context) == named(caption), (context, caption)
        orders.add(context)
    assert len(orders) > 1
    # with caption fine-tuning's prompt, every caption is read as it is, and about half of them also after it
    prompted = described_captions(str(synth["dir"]), records, "a photo of")
    after = [c[len("a photo of "):] for _, c in prompted if c.startswith("a photo of ")]
    assert sorted(c for _, c in prompted if not c.startswith("a photo of ")) == sorted(c for _, c in pairs)
    assert 0.3 < len(after) / len(pairs) < 0.7 and set(after) <= {c for _, c in pairs}
    ann = str(synth["ann"]["train"])
    r = subprocess.run([sys.executable, "data_scripts/train_demo_llm.py", "--annotations", ann, "--out",
                        str(tmp_path / "llm"), "--qa-data-dir", str(synth["dir"]), "--caption-context", "description",
                        "--vocab-size", "512", "--steps", "3"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "llm"))
    assert tok.tokenize(" yellow triangle") == ["Ġyellow", "Ġtriangle"]  # 512: one token a word
    r = subprocess.run([sys.executable, "data_scripts/train_demo_llm.py", "--annotations", ann, "--out",
                        str(tmp_path / "llm2"), "--caption-context", "description"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "give --qa-data-dir" in r.stderr
    r = subprocess.run([sys.executable, "data_scripts/train_demo_llm.py", "--annotations", ann, "--out",
                        str(tmp_path / "llm3"), "--caption-prompt", "a photo of"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--caption-prompt needs --caption-context description" in r.stderr


def test_demo_llm_reads_the_prompt_caption_fine_tuning_gives_it():
    """prepare_synthetic.sh trains the LLM stand-in with experiment=caption_coco_ft's own prompt (its one owner)."""
    from blip2_train.config.compose import compose

    prompt = compose("train", ["experiment=caption_coco_ft", "preset=tiny"]).model.text.prompt
    assert prompt and f'--caption-prompt "{prompt}"' in (REPO / "run_scripts/prepare_synthetic.sh").read_text()


def test_prepare_synthetic_keeps_a_data_dir_of_its_world_only(tmp_path):
    """run_scripts/prepare_synthetic.sh keeps a complete data dir whose world.json names the demo's world, and
    makes any other one again (a data dir of world 1, the one-or-two-shape world make demo used before); its
    `data` and `llm` parts; an LLM stand-in of another recipe (llm/recipe.txt) is trained again, and a ViT
    stand-in of another recipe (vit/recipe.txt) pretrained again."""
    import os
    import re
    import shlex

    from blip2_train.demo.world import WORLD_VERSION

    script = (REPO / "run_scripts/prepare_synthetic.sh").read_text()
    import hashlib

    def recipe_of(name: str) -> tuple[str, str]:  # llm_recipe / vit_recipe: (its arguments, the whole line)
        args = " ".join(shlex.split(re.search(rf"^{name}=\((.*)\)$", script, re.M).group(1)))  # "${LLM[*]}"
        code = shlex.split(re.search(rf"^{name}_CODE=\(([^)]*)\)$", script, re.M | re.S).group(1))
        fingerprint = hashlib.sha256(b"".join((REPO / f).read_bytes() for f in code)).hexdigest()[:16]
        return args, f"{args} code {fingerprint}"

    args, recipe = recipe_of("LLM")
    vit_args, vit_recipe = recipe_of("VIT")
    data = tmp_path / "synthetic"
    complete = ("shards/vg_caption/manifest.json", "shards/vqav2_train/manifest.json", "shards/vg_qa/manifest.json",
                "bert/config.json",
                "llm/config.json",
                "vqav2/annotations/v2_mscoco_val2014_annotations.json", "vit/model.safetensors")
    for f in complete:  # what the script checks for a complete data dir
        (data / f).parent.mkdir(parents=True, exist_ok=True)
        (data / f).write_text("{}")
    (data / "llm/recipe.txt").write_text(recipe + "\n")
    (data / "vit/recipe.txt").write_text(vit_recipe + "\n")
    env = {**os.environ, "BLIP2_DATA_DIR": str(tmp_path), "PY": sys.executable, "NUM_TRAIN": "0"}

    def prepare(*part: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "run_scripts/prepare_synthetic.sh", *part], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)

    demo_world = {"num_colors": 10, "min_objects": 1, "max_objects": 3}
    (data / "world.json").write_text(json.dumps({"world_version": WORLD_VERSION, "world": demo_world}))
    r = prepare()
    assert r.returncode == 0 and "synthetic data ready" in r.stdout and "LLM stand-in ready" in r.stdout, r.stderr
    assert (data / "llm/config.json").exists()
    r = prepare("data")
    assert r.returncode == 0 and "synthetic data ready" in r.stdout and "LLM" not in r.stdout, r.stderr
    r = prepare("vit")
    assert r.returncode == 2 and "usage: prepare_synthetic.sh [all|data|llm] (got 'vit')" in r.stderr
    # an LLM stand-in of another recipe (the same arguments, other code) is trained again, alone: here
    # the fake data dir stops its training at once, the data kept
    (data / "llm/recipe.txt").write_text(f"{args} code 0000000000000000\n")
    r = prepare("llm")
    assert r.returncode != 0 and "trained another way (llm/recipe.txt): training it again" in r.stdout, r.stdout
    assert not (data / "llm/config.json").exists() and (data / "vit/model.safetensors").exists()
    (data / "llm/config.json").parent.mkdir(exist_ok=True)
    (data / "llm/config.json").write_text("{}")
    (data / "llm/recipe.txt").write_text(recipe + "\n")
    # a ViT stand-in of another recipe (without the cell read-out, say) is pretrained again, the data and the LLM
    # stand-in kept; the fake data dir stops its pretraining at once
    (data / "vit/recipe.txt").write_text(f"{vit_args} code 0000000000000000\n")
    r = prepare("data")
    assert r.returncode != 0 and "pretrained another way (vit/recipe.txt): pretraining it again" in r.stdout, r.stdout
    assert not (data / "vit/model.safetensors").exists() and (data / "llm/config.json").exists()
    r = prepare("llm")  # the LLM stand-in is trained on a complete data dir only
    assert r.returncode == 2 and "run prepare_synthetic.sh data first" in r.stderr
    (data / "vit").mkdir(exist_ok=True)
    (data / "vit/model.safetensors").write_text("{}")
    (data / "vit/recipe.txt").write_text(vit_recipe + "\n")
    assert prepare().returncode == 0
    # world 1 named, and a world.json from before worlds were named: made again. The old dir goes; then (so that
    # the test draws and trains nothing) NUM_TRAIN=0 stops the script at make_synthetic.py's usage error
    for old in ({"world_version": WORLD_VERSION, "world": {"num_colors": 6, "min_objects": 1, "max_objects": 2}},
                {"world_version": WORLD_VERSION, "splits": {}}):
        for f in complete:  # complete, so only world.json can make it go
            (data / f).parent.mkdir(parents=True, exist_ok=True)
            (data / f).write_text("{}")
        (data / "world.json").write_text(json.dumps(old))
        r = prepare(timeout=300)
        assert r.returncode == 2 and "synthetic data ready" not in r.stdout, r.stdout[-2000:]
        assert "of another world" in r.stdout and "--num-train/--num-val/--num-test must each be at least 1" in r.stderr
        assert not (data / "world.json").exists() and not (data / "llm/config.json").exists()
    r = prepare("llm")  # no data to train the LLM stand-in on
    assert r.returncode == 2 and "run prepare_synthetic.sh data first" in r.stderr


def test_caption_ceiling_scores_perfect_and_blind_captions_of_a_world():
    """data_scripts/caption_ceiling.py: in world 1's palette with two or three shapes, perfect captions earn
    only a few times the best fixed caption's CIDEr (the words all captions share); ten colours raise that
    ceiling (docs/demo.md's reason for make demo's world). Same draws as make_synthetic, the evaluation's CIDEr."""
    sys.path.insert(0, str(REPO / "data_scripts"))
    try:
        from caption_ceiling import ceiling
    finally:
        sys.path.pop(0)
    six = ceiling(6, 2, 3, images=200, candidates=30)
    ten = ceiling(10, 1, 3, images=200, candidates=30)
    for r in (six, ten):
        # (quadrant words are common, so placing shapes wrong costs perfect captions little: no order between those)
        assert min(r["perfect"], r["colours_and_shapes"]) > r["colours_only"] > r["blind"] > 0
    assert six["perfect/blind"] < 5 < ten["perfect/blind"]
    r = subprocess.run([sys.executable, "data_scripts/caption_ceiling.py", "--images", "40", "--candidates", "5"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "x the image-blind" in r.stdout and "best of 5 fixed captions" in r.stdout, r.stderr


def test_demo_background_jobs_fail_the_demo_early_and_leave_nothing_running(tmp_path):
    """run_scripts/demo_jobs.sh, as make demo uses it: a failed background job stops the demo at the next
    `check` (exit 1, the end of its log on stderr), a finished one is finished once, and on exit a job still
    running is stopped with its children."""
    import os
    import time

    script = tmp_path / "demo.sh"
    script.write_text(f"""set -euo pipefail
OUT={tmp_path}/out; mkdir -p "$OUT/logs"
source run_scripts/demo_jobs.sh
background ok bash -c 'echo fine'
background sleeper bash -c 'sleep 300 & echo $! > {tmp_path}/child.pid; wait'
background bad bash -c 'echo some output; echo boom >&2; exit 3'
sleep 1
check ok; check ok; finish ok
check bad
echo not reached
""")
    r = subprocess.run(["bash", str(script)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "not reached" not in r.stdout, (r.stdout, r.stderr)
    assert r.stdout.count("(ok done") == 1
    assert "'bad' failed (exit status 3)" in r.stderr and "some output\nboom" in r.stderr
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the sleeper's child went with its process group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, 9)
        raise AssertionError("a background job's child outlived the demo")
