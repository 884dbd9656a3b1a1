"""`blip2-export` as a user runs it (the console script) on a real tiny run's checkpoint: the model card it
writes records the run's config and metrics, and its loading snippet runs; `--push-to-hub` without a token, with
an unreachable endpoint or offline ends in one line and keeps the local export. Nothing here reaches a network:
every endpoint is a closed local port."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.procs import REPO, clean_env, one_line, run
from helpers.tiny import tiny_cli

EXPORT = Path(sys.executable).parent / "blip2-export"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: nothing listens there


def blip2_export(*args, **env) -> subprocess.CompletedProcess:
    """The console script, with only the Hub settings the test gives and the endpoint a closed local port."""
    full = clean_env(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        full.pop(k, None)
    full.update({k: str(v) for k, v in env.items()})
    return subprocess.run([str(EXPORT), *map(str, args)], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def run_dir(synth, tmp_path_factory) -> Path:
    """A stage-1 run of 2 steps with its final retrieval evaluation: config.yaml, metrics.json, last.ckpt."""
    out = tmp_path_factory.mktemp("card_run") / "run"
    run("train", ["experiment=stage1_pretrain", *tiny_cli(synth, "trainer.max_steps=2", "data.batch_size=4",
                                                            "data.samples_per_epoch=32", "data.eval_set.limit=6",
                                                            "eval.k_test=3"), f"paths.output_dir={out}"])
    return out


def test_the_card_records_the_run_and_its_snippet_runs_against_the_export(run_dir, tmp_path):
    out = tmp_path / "export"
    r = blip2_export(run_dir / "checkpoints" / "last.ckpt", "--out", out, "--base-model", "Salesforce/blip2-opt-2.7b",
                     HF_HOME=tmp_path / "hf")
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(rf"model card: {re.escape(str(out / 'README.md'))} \(license unknown; \d+ evaluation figures\)",
                     r.stdout), r.stdout
    card = (out / "README.md").read_text()
    fm = yaml.safe_load(card.split("---\n")[1])
    assert fm["pipeline_tag"] == "zero-shot-image-classification" and fm["library_name"] == "transformers"
    assert fm["base_model"] == ["Salesforce/blip2-opt-2.7b"] and fm["license"] == "unknown"  # tiny towers: unknown
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert f"experiment: `{cfg['task_name']}`" in card and f"lr `{cfg['module']['lr']}`" in card
    assert f"`{cfg['data']['train_sources'][0]['urls']}`" in card and "k_test 3" in card
    m = json.loads((run_dir / "metrics.json").read_text())
    assert f"`{run_dir / 'metrics.json'}`, step 2" in card
    for k in ("txt_r1", "img_r1", "r_mean"):
        assert f"| {k} | {m[k]:.2f} |" in card
    assert "from step 2" not in card  # the export is of the step the figures are from
    # the snippet, exactly as the card has it, in a directory holding an image
    code = re.search(r"```python\n(.*?)\n```", card, re.S).group(1)
    assert f'Blip2ForImageTextRetrieval.from_pretrained("{out}")' in code
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "image.jpg")
    (tmp_path / "snippet.py").write_text(code)
    s = subprocess.run([sys.executable, "snippet.py"], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert s.returncode == 0, s.stderr[-3000:]
    assert re.findall(r"^a photo of a (dog|cat): itc -?\d\.\d{3}, itm \d\.\d{3}$", s.stdout, re.M) == ["dog", "cat"]


PUSH_FAILURES = {  # the environment (beside HF_HOME without a stored token) -> what the one line says
    "no_token": ({}, r"no Hugging Face token \(set HF_TOKEN or run `hf auth login`\)"),
    "unreachable": ({"HF_TOKEN": "hf_dummy"}, r"http://127\.0\.0\.1:\d+ is unreachable \(.*Connection refused\)"),
    "offline": ({"HF_TOKEN": "hf_dummy", "HF_HUB_OFFLINE": "1"}, r"HF_HUB_OFFLINE is set"),
}


@pytest.mark.parametrize("case", PUSH_FAILURES)
def test_push_to_hub_failures_are_one_line_and_keep_the_local_export(case, run_dir, tmp_path):
    env, said = PUSH_FAILURES[case]
    out = tmp_path / "export"
    r = blip2_export(run_dir / "checkpoints" / "last.ckpt", "--out", out, "--push-to-hub", "me/blip2-tiny",
                     HF_HOME=tmp_path / "hf", **env)
    where = re.escape(str(out))
    assert re.search(rf"^error: cannot push to me/blip2-tiny: {said}; the export in {where} is complete; push it "
                     rf"later with `hf upload me/blip2-tiny {where} \.`$", one_line(r))
    for f in ("config.json", "model.safetensors", "blip2_train.json", "README.md"):  # the local export, whole
        assert (out / f).stat().st_size > 0, f
    assert 'from_pretrained("me/blip2-tiny")' in (out / "README.md").read_text()  # the card names the repo


def test_a_repo_id_that_is_not_org_name_is_refused_before_any_work(tmp_path):
    r = blip2_export(tmp_path / "any.ckpt", "--out", tmp_path / "bad", "--push-to-hub", "noslash")
    assert r.returncode == 2 and "'noslash' is not a hub id (ORG/NAME" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()
