"""Reliability through the CLI, each fault injected the way a user meets it: nothing hangs or floods the log,
every bad value is one line (wrong config types, checkpoints of the other stage, a missing LLM), NaN losses are
skipped, and a run's history survives kills (also during a save), truncated checkpoints and resumes.
The list of bad inputs covered is tests/BAD_INPUTS.md (bad images, shards and annotations: unit/test_data.py);
every subprocess has a timeout, so a regression to "spins forever" fails instead of hanging the suite."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import procs
from helpers.procs import REPO, clean_env, one_line
from helpers.tiny import tiny_cli, tiny_stage1

LIMIT = 90  # seconds: the bound for every bad input


def train_args(synth, out: Path, *extra) -> list[str]:
    return ["experiment=stage1_pretrain",
            *tiny_cli(synth, "data.batch_size=4", "data.samples_per_epoch=40", "eval.enabled=false",
                      "callbacks.periodic_eval.every_n_steps=0", "logger=csv", "trainer.log_every_n_steps=1",
                      "callbacks.model_checkpoint.every_n_train_steps=5", f"paths.output_dir={out}", *extra)]


def only_source(shards: Path) -> str:
    """One training source (stage1_pretrain has two, COCO and VG): these shards."""
    return f"data.train_sources=[{{name:coco,urls:'{shards}'}}]"


def cli(*args, tool="train", timeout=LIMIT):
    return procs.cli(*args, tool=tool, timeout=timeout)


def logged_steps(run: Path) -> list[int]:
    with open(run / "csv" / "metrics.csv") as f:
        return sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")})


def steps_on_disk(run: Path) -> list[int]:
    try:
        return logged_steps(run)
    except (OSError, KeyError, ValueError):  # not written yet, or a row being written
        return []


@pytest.fixture(scope="module")
def base_run(synth, tmp_path_factory) -> Path:
    """A finished 10-step run: step0000005.ckpt, step0000010.ckpt, last.ckpt, metrics.csv with steps 0-9."""
    out = tmp_path_factory.mktemp("base") / "run"
    r = cli(*train_args(synth, out, "trainer.max_steps=10", "logger=[csv,tensorboard]"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert logged_steps(out) == list(range(10))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    return out


def copy_run(base_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


# -- the stream cannot spin -----------------------------------------------------------------------------------

def test_only_shard_unreadable_ends_in_one_line_naming_it(synth, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(os.urandom(20_000))
    t0 = time.time()
    r = cli(*train_args(synth, tmp_path / "run", only_source(shards), "data.num_workers=2",
                        "trainer.max_steps=5"))
    line = one_line(r)
    assert "no readable sample" in line and "00000.tar" in line
    assert time.time() - t0 < LIMIT
    # rate-limited: one warning per worker, not one per re-read
    assert sum("unreadable shard" in l for l in r.stderr.splitlines()) <= 2, r.stderr[-3000:]
    assert len(r.stderr.splitlines()) < 40, r.stderr[-3000:]


@pytest.mark.timeout(LIMIT)
def test_unreadable_shards_count_toward_the_skip_rate(tmp_path, tokenizer):
    """One readable shard among three of random bytes: each unreadable shard counts as a skipped sample, so the
    repeating (resampled) stream stops at the skip-rate bound instead of training on quietly."""
    from PIL import Image

    from blip2_train.utils.errors import DataError
    from blip2_train.data.shards import make_jpeg
    from helpers.shards import write_tar

    good = make_jpeg(Image.new("RGB", (20, 20), (0, 200, 0)))
    write_tar(tmp_path / "good.tar", [(f"g{i}", {"jpg": good, "json": b'{"caption": "a green square"}'}) for i in range(4)])
    urls = [str(tmp_path / "good.tar")]
    for i in range(3):
        (tmp_path / f"bad{i}.tar").write_bytes(os.urandom(5000))
        urls.append(str(tmp_path / f"bad{i}.tar"))
    from blip2_train.data.collate import CaptionCollator
    from blip2_train.data.decode import SampleDecoder
    from blip2_train.data.stream import ShardStream, Source
    from blip2_train.data.transforms import TrainTransform

    stream = ShardStream([Source("t", urls)], SampleDecoder(TrainTransform(16, hflip=False)),
                         CaptionCollator(tokenizer), 4, resampled=True, shuffle_buffer=0, batches_per_epoch=1000,
                         max_skip_rate=0.2, min_samples_for_skip_check=20)
    with pytest.raises(DataError, match=r"unreadable tar.*max_skip_rate=0.2"):
        list(stream)
    # below the bound it trains on: the readable shard's samples come through, no "no readable sample" error
    stream.max_skip_rate, stream.min_samples_for_skip_check, stream.batches_per_epoch = 0.9, 50, 20
    assert sum(b["image"].shape[0] for b in stream) == 80


def test_identical_warnings_are_rate_limited_with_a_count():
    import logging

    from blip2_train.data.decode import WarningLimiter

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("test_limiter")
    logger.addHandler(Keep())
    w = WarningLimiter(logger)
    for _ in range(1234):
        w.warn("shard a.tar unreadable")
    w.warn("another")
    for i in range(25):  # distinct messages of one kind: the first 10 in full, then counted
        w.warn(f"skip s{i}: cannot decode image", "bad image")
    w.summary()
    assert records == ["shard a.tar unreadable", "shard a.tar unreadable (10 times so far)",
                       "shard a.tar unreadable (100 times so far)", "shard a.tar unreadable (1000 times so far)",
                       "another", *[f"skip s{i}: cannot decode image" for i in range(10)],
                       "shard a.tar unreadable (1234 times in all)",
                       "25 'bad image' warnings in all (latest: skip s24: cannot decode image)"]


# -- config values checked for range before any work -----------------------------------------------------------

@pytest.mark.timeout(LIMIT)
@pytest.mark.parametrize("override,key", [("data.batch_size=-3", "data.batch_size"),
                                          ("data.batch_size=0", "data.batch_size"),
                                          ("model.num_query_tokens=0", "model.num_query_tokens"),
                                          ("arch.num_query_tokens=0", "model.num_query_tokens=0 (from ${arch"),
                                          ("eval.k_test=0", "eval.k_test"),
                                          ("trainer.max_steps=0", "trainer.max_steps"),
                                          # -1 is Lightning's "no limit", but the schedule needs a length
                                          ("trainer.max_steps=-1", "trainer.max_steps=-1 is out of range without trainer.max_epochs"),
                                          ("data.image_size=-32", "data.image_size"),
                                          ("data.num_workers=-1", "data.num_workers"),
                                          ("data.max_skip_rate=1.5", "data.max_skip_rate")])
def test_config_value_out_of_range_is_one_line_before_any_work(synth, tmp_path, capsys, override, key):
    from blip2_train.cli.train import main

    rc = main(train_args(synth, tmp_path / "run", override))
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(err) == 1 and key in err[0] and "out of range" in err[0], err
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_eval_k_test_out_of_range_is_one_line(synth, tmp_path, capsys):
    from blip2_train.cli.evaluate import main

    rc = main(["experiment=retrieval_coco_eval", "preset=tiny", f"paths.data_dir={synth['dir']}",
               "paths.stage1_checkpoint=null", "eval.k_test=-1", f"paths.output_dir={tmp_path / 'ev'}"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "eval.k_test=-1" in err[0] and ">= 1" in err[0]
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("override,line", [
    ("eval.rerank_score=products", "eval.rerank_score='products' must be one of ['reference', 'product']"),
    ("eval.kind=retreival", "eval.kind='retreival' must be one of ['retrieval', 'caption', 'vqa', 'classify']")])
def test_eval_setting_outside_its_choices_is_one_line(synth, tmp_path, capsys, override, line):
    """A misspelt score rule or kind is refused before any work, by blip2-eval and by blip2-train (whose
    periodic and final evaluations would otherwise fail after training)."""
    from blip2_train.cli.evaluate import main as evaluate
    from blip2_train.cli.train import main as train

    rc = evaluate(["experiment=retrieval_coco_eval", "preset=tiny", f"paths.data_dir={synth['dir']}",
                   "paths.stage1_checkpoint=null", override, f"paths.output_dir={tmp_path / 'ev'}"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(err) == 1 and line in err[0], err
    assert not (tmp_path / "ev").exists()
    rc = train(train_args(synth, tmp_path / "run", override))
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(err) == 1 and line in err[0], err
    assert not (tmp_path / "run").exists()


# -- a run's history survives kills, truncated checkpoints and resumes -------------------------------------------

def test_killed_run_resumed_with_auto_keeps_its_whole_metrics_history(synth, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "blip2_train.cli.train",
                             *train_args(synth, out, "trainer.max_steps=30")],
                            cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + LIMIT
    # killed a few steps after its checkpoint, as a real run killed at step 140 after step0000120.ckpt
    while not ((out / "checkpoints" / "step0000015.ckpt").exists() and 17 in steps_on_disk(out)):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists()
    assert logged_steps(out)[:18] == list(range(18))  # flushed every step: nothing logged is lost to the kill
    r = cli(*train_args(synth, out, "trainer.max_steps=30", "ckpt_path=auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "taking over the stale lock" in r.stderr  # the killed run's lock
    assert logged_steps(out) == list(range(30))  # steps before the checkpoint kept, the rest appended
    assert not (out / ".run.lock").exists()


def test_truncated_last_ckpt_explicit_is_one_line_and_deletes_nothing(synth, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    history = (out / "csv" / "metrics.csv").read_bytes()
    line = one_line(cli(*train_args(synth, out, f"ckpt_path={last}", "trainer.max_steps=15")))
    assert "last.ckpt" in line and "unreadable" in line and "truncated" in line
    assert (out / "csv" / "metrics.csv").read_bytes() == history


def test_auto_skips_a_truncated_last_ckpt_and_resumes_from_the_intact_one(synth, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    last = out / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    r = cli(*train_args(synth, out, "trainer.max_steps=15", "ckpt_path=auto", "logger=[csv,tensorboard]"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # the run continues beside the first
    warn = [l for l in r.stderr.splitlines() if "skipping unreadable checkpoint" in l]
    assert len(warn) == 1 and "last.ckpt" in warn[0] and "step0000010.ckpt" in warn[0]
    assert logged_steps(out) == list(range(15))
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 15


def test_resume_after_kill_between_step_and_last_ckpt_leaves_no_duplicates_or_debris(synth, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    ckpts = out / "checkpoints"
    # killed after step0000010.ckpt was written but before last.ckpt: last.ckpt still holds step 5, and the
    # atomic save of the new last.ckpt left its temporary file
    shutil.copy(ckpts / "step0000005.ckpt", ckpts / "last.ckpt")
    t = (ckpts / "step0000010.ckpt").stat().st_mtime
    os.utime(ckpts / "last.ckpt", (t - 5, t - 5))
    (ckpts / ".last.ckpt.tmp-999999").write_bytes(b"partial")
    r = cli(*train_args(synth, out, "trainer.max_steps=15", "ckpt_path=auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming from {ckpts / 'step0000010.ckpt'}" in r.stderr  # the newest checkpoint, not the stale last
    # an explicit resume from step 5 saves step 10 again: over the old file, not beside it as -v1
    r = cli(*train_args(synth, out, "trainer.max_steps=10", f"ckpt_path={ckpts / 'step0000005.ckpt'}"))
    assert r.returncode == 0, r.stderr[-3000:]
    names = sorted(p.name for p in ckpts.iterdir())
    assert names == ["last.ckpt", "step0000005.ckpt", "step0000010.ckpt", "step0000015.ckpt"], names


# -- one run per output directory -----------------------------------------------------------------------------

def test_second_run_into_a_directory_in_use_is_refused_naming_the_holder(synth, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "blip2_train.cli.train",
                              *train_args(synth, out, "trainer.max_steps=100000")],
                             cwd=REPO, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + LIMIT
        while not (out / ".hydra" / "overrides.yaml").exists():  # the record: written once the run is its own
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        record = {p.name: p.read_bytes() for p in [out / "config.yaml", *(out / ".hydra").iterdir()]}
        line = one_line(cli(*train_args(synth, out, "trainer.max_steps=5")))
        assert "in use by another run" in line and f"pid {first.pid}" in line
        assert first.poll() is None  # the first run goes on
        holder = json.loads((out / ".run.lock").read_text())
        assert holder["pid"] == first.pid
        # the refused start changed nothing of the first run's record
        assert {p.name: p.read_bytes() for p in [out / "config.yaml", *(out / ".hydra").iterdir()]} == record
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_a_refused_start_changes_nothing_and_leaves_no_directory(synth, base_run, tmp_path, tiny_llms):
    out = copy_run(base_run, tmp_path)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert "trainer.max_steps=10" in (out / ".hydra" / "overrides.yaml").read_text()
    line = one_line(cli(*train_args(synth, out, "trainer.max_steps=20")))  # a finished run's directory
    assert "already holds checkpoints" in line and "ckpt_path=auto" in line
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # refused after its directory was made (no paths.output_dir: <log_dir>/<task>/<stamp>): nothing left
    logs = tmp_path / "logs"
    line = one_line(cli("experiment=stage2_pretrain", *tiny_cli(synth, f"paths.llm_dir={tmp_path / 'no_llm'}",
                                                                "paths.stage1_checkpoint=null",
                                                                f"paths.log_dir={logs}")))
    assert "no_llm" in line
    assert not logs.exists() or not any(p.is_file() for p in logs.rglob("*")), sorted(logs.rglob("*"))


# -- evaluation sets fail in one line naming the file and the entry ---------------------------------------------

def eval_args(synth, out, *extra):
    return ["experiment=retrieval_coco_eval", "preset=tiny", f"paths.data_dir={synth['dir']}",
            "paths.stage1_checkpoint=null", "eval.k_test=2", f"paths.output_dir={out}", "device=cpu", *extra]


def test_eval_annotation_json_object_names_file_and_entry(synth, tmp_path):
    ann = tmp_path / "coco_style.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}))
    line = one_line(cli(*eval_args(synth, tmp_path / "ev", f"data.eval_set.annotation={ann}",
                                   f"data.eval_set.image_root={tmp_path}"), tool="evaluate"))
    assert "coco_style.json" in line and "images[0]" in line and "format=coco" in line


def test_zero_byte_eval_image_names_the_file(synth, tmp_path):
    records = json.loads(Path(synth["ann"]["test"]).read_text())[:6]
    root = tmp_path / "images"
    for rec in records:
        (root / rec["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(synth["root"] / rec["image"], root / rec["image"])
    (root / records[3]["image"]).write_bytes(b"")
    ann = tmp_path / "test.json"
    ann.write_text(json.dumps(records))
    line = one_line(cli(*eval_args(synth, tmp_path / "ev", f"data.eval_set.annotation={ann}",
                                   f"data.eval_set.image_root={root}"), tool="evaluate"))
    assert records[3]["image"] in line and "empty file" in line and "DataLoader worker" not in line


def test_run_lock_holder_rules(tmp_path, monkeypatch):
    """Who may take a lock that exists: a dead or reused pid on this host and a requeued SLURM job on another
    node take it over; a live process here or an unknown one elsewhere is named in the refusal."""
    import socket

    from blip2_train.cli.run_lock import LOCK_NAME, acquire_run_lock, release_run_locks
    from blip2_train.config.run_dir import pid_start as _pid_start
    from blip2_train.utils.errors import ConfigError

    lock = tmp_path / LOCK_NAME
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def holder(**kw):
            lock.write_text(json.dumps({"host": host, "pid": sleeper.pid, "started": "earlier",
                                        "pid_start": _pid_start(sleeper.pid), "job": None, **kw}))

        holder()
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {sleeper.pid} on {host}, started earlier"):
            acquire_run_lock(tmp_path)
        holder(pid_start="1")  # the pid now belongs to another process
        acquire_run_lock(tmp_path)
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        release_run_locks()
        assert not lock.exists()
        holder(host="node-17")
        with pytest.raises(ConfigError, match="on node-17"):
            acquire_run_lock(tmp_path)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        holder(host="node-17", job="4242")  # the same job, requeued onto this node
        acquire_run_lock(tmp_path)
        release_run_locks()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_epoch_based_runs_pass_the_range_check():
    """caption_coco_ft / retrieval_coco_ft count epochs: max_steps=-1 with max_epochs is a length."""
    from blip2_train.config.compose import compose
    from blip2_train.config.ranges import check_ranges

    for exp in ("caption_coco_ft", "retrieval_coco_ft"):
        check_ranges(compose("train", [f"experiment={exp}"]))
    check_ranges(compose("train", ["experiment=stage2_pretrain", "trainer.max_steps=-1", "trainer.max_epochs=5"]))


@pytest.mark.parametrize("override,key", [("data.batch_size=abc", "data.batch_size"),
                                          ("module.lr=fast", "module.lr"),
                                          ("model.freeze_vision=maybe", "model.freeze_vision")])
def test_config_value_of_wrong_type_is_one_line(synth, tmp_path, capsys, override, key):
    from blip2_train.cli.train import main

    rc = main(["experiment=stage1_pretrain", *tiny_cli(synth, override, f"paths.output_dir={tmp_path / 'run'}")])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(err) == 1 and key in err[0] and "must be" in err[0]
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_nonexistent_llm_path_is_one_line(synth, tmp_path, stage1_export, capsys):
    from blip2_train.cli.train import main

    rc = main(["experiment=stage2_pretrain", *tiny_cli(synth, f"paths.llm_dir={tmp_path / 'no_llm'}",
                                                       f"paths.stage1_checkpoint={stage1_export}",
                                                       f"paths.output_dir={tmp_path / 'run'}")])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "no_llm" in err[0] and "not found" in err[0]


def test_checkpoint_of_the_other_stage_is_refused(synth, tiny_llms, stage1_export, tmp_path):
    from blip2_train.utils.checkpoints import load_lightning_checkpoint
    from blip2_train.utils.errors import CheckpointError
    from helpers.tiny import tiny_stage2

    s1 = tmp_path / "s1"
    r = cli("experiment=stage1_pretrain", *tiny_cli(synth, "trainer.max_steps=2", "data.batch_size=4",
                                                    "data.samples_per_epoch=40", "eval.enabled=false",
                                                    f"paths.output_dir={s1}"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = s1 / "checkpoints" / "last.ckpt"
    # resuming a stage-2 run from a stage-1 checkpoint
    line = one_line(cli("experiment=stage2_pretrain", *tiny_cli(synth, f"paths.llm_dir={tiny_llms['opt']}",
                                                                "paths.stage1_checkpoint=null", f"ckpt_path={ckpt}",
                                                                f"paths.output_dir={tmp_path / 's2'}"), timeout=300))
    assert "stage-1" in line and "paths.stage1_checkpoint" in line
    # and the other way: a stage-1 run given a stage-2 checkpoint is told which experiment resumes it
    s2 = tmp_path / "s2ok"
    r = cli("experiment=stage2_pretrain", *tiny_cli(synth, f"paths.llm_dir={tiny_llms['opt']}", "trainer.max_steps=1",
                                                    "data.batch_size=4", "data.samples_per_epoch=40",
                                                    "eval.enabled=false", f"paths.stage1_checkpoint={ckpt}",
                                                    f"paths.output_dir={s2}"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    line = one_line(cli("experiment=stage1_pretrain", *tiny_cli(synth, f"ckpt_path={s2 / 'checkpoints' / 'last.ckpt'}",
                                                                f"paths.output_dir={tmp_path / 's1b'}"), timeout=300))
    assert "stage-2" in line and "experiment=stage2_pretrain" in line and "stage1_checkpoint" not in line
    # loading it into a stage-2 model for evaluation or export
    with pytest.raises(CheckpointError, match="stage-1 checkpoint but the model configured here is stage 2"):
        load_lightning_checkpoint(tiny_stage2(tiny_llms["opt"]), ckpt)
    # a stage-1 Lightning checkpoint IS a valid start for stage 2 (its run config rebuilds the frozen ViT)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                  image_size=32, layer_norm_eps=1e-6)
    qformer = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   max_position_embeddings=64)
    m = tiny_stage2(tiny_llms["opt"], ckpt, vision=vision, qformer=qformer, num_query_tokens=8)
    from blip2_train.utils.checkpoints import run_config_of
    from hydra.utils import instantiate

    s1_model = instantiate(run_config_of(ckpt).model)
    load_lightning_checkpoint(s1_model, ckpt)
    torch.testing.assert_close(m.hf.query_tokens, s1_model.hf.query_tokens, rtol=0, atol=0)


def test_nonfinite_losses_are_skipped_counted_then_stop(synth, tokenizer):
    import lightning as L

    from blip2_train.lit.stage1 import NonFiniteLossError, Stage1Module
    from helpers.tiny import batch_of

    def batches(pattern):
        out = []
        for i, bad in enumerate(pattern):
            img, ids, mask = batch_of(tokenizer, ["a red circle", "a blue square", "two green triangles"], seed=i)
            if bad:
                img = torch.full_like(img, float("nan"))
            out.append({"image": img, "input_ids": ids, "attention_mask": mask, "image_id": torch.arange(3)})
        return out

    def fit(pattern, max_steps, limit):
        module = Stage1Module(tiny_stage1(synth["tokenizer"]), lr=1e-3, warmup_steps=0, max_steps=max_steps,
                              max_consecutive_nonfinite=limit)
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches(pattern), batch_size=None))
        return module, trainer

    module, trainer = fit([0, 1, 0, 1, 0, 0], max_steps=6, limit=3)
    # 6 steps, the 2 with a NaN counted and skipped: AdamW updated weights and moments 4 times only
    assert module.nonfinite_total == 2 and trainer.global_step == 6
    opt = trainer.optimizers[0]
    assert {int(opt.state[p]["step"]) for g in opt.param_groups for p in g["params"]} == {4}
    assert all(torch.isfinite(p).all() for p in module.model.parameters())
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row"):
        fit([0, 1, 1, 1, 0], max_steps=5, limit=3)


def test_kill_during_checkpoint_save_leaves_the_previous_one_intact(synth, tmp_path):
    out = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "helpers" / "slow_save_worker.py"), str(synth["tokenizer"]),
                             str(synth["train_shards"]), str(out)], cwd=REPO, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list(out.glob(".step010.ckpt.tmp-*")) and not list(out.glob(".last.ckpt.tmp-*")):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the slow save never started"
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the save: part of the file is written
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = sorted(p.name for p in out.iterdir())
    assert "step005.ckpt" in names and "last.ckpt" in names and "step010.ckpt" not in names, names
    last = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5 and "slow" not in last  # the previous checkpoint, whole
    from blip2_train.lit.checkpoint_io import AtomicCheckpointIO

    AtomicCheckpointIO().save_checkpoint({"x": 1}, out / "step010.ckpt")  # the next save cleans the debris
    assert not list(out.glob(".*.tmp-*"))


def test_coco_annotation_of_the_wrong_shape_names_the_file(tmp_path):
    from blip2_train.data.annotations import read_annotations
    from blip2_train.utils.errors import DataError

    bad = tmp_path / "nocaps.json"
    bad.write_text(json.dumps([{"image": "a.jpg"}]))
    with pytest.raises(DataError, match="nocaps.json.*COCO caption file"):
        read_annotations(bad, "coco")
    bad.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2}]}))
    with pytest.raises(DataError, match=r"annotations\[0\] refers to image_id 2"):
        read_annotations(bad, "coco")


def test_a_checkpoint_missing_a_trained_weight_is_refused_by_name(synth, tmp_path):
    """blip2-export of a Lightning checkpoint that lost a Q-Former weight: one error naming it, no export
    (it would otherwise keep that weight at its initial values)."""
    r = cli("experiment=stage1_pretrain", *tiny_cli(synth, "trainer.max_steps=1", "data.batch_size=4",
                                                    "data.samples_per_epoch=40", "eval.enabled=false",
                                                    f"paths.output_dir={tmp_path / 'run'}"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    name = "model.hf.qformer.encoder.layer.0.attention.attention.query.weight"
    assert name in state["state_dict"]
    del state["state_dict"][name]
    torch.save(state, ckpt)
    import subprocess
    import sys

    from helpers.procs import REPO, clean_env

    r = subprocess.run([sys.executable, "-m", "blip2_train.cli.export", str(ckpt), "--out", str(tmp_path / "exp")],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "hf.qformer.encoder.layer.0.attention.attention.query.weight" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "exp").exists()


def _file_size_limit(limit: int):
    """A full disk, as a process meets it: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored, as a
    shell's `ulimit -f` leaves a Python process)."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_is_one_line_naming_the_file_and_the_intact_checkpoint(synth, base_run, tmp_path):
    out = copy_run(base_run, tmp_path)
    ckpts = out / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckpts.glob("*.ckpt")}
    rows_before = (out / "csv" / "metrics.csv").read_text()
    # a checkpoint (1.7 MB at tiny size) does not fit; the logs and the config record do
    r = subprocess.run([sys.executable, "-m", "blip2_train.cli.train",
                        *train_args(synth, out, "trainer.max_steps=15", "ckpt_path=auto")], cwd=REPO,
                       env=clean_env(), capture_output=True, text=True, timeout=LIMIT,
                       preexec_fn=_file_size_limit(1_000_000))
    line = one_line(r)
    assert "file size limit" in line and "step0000015.ckpt" in line and "free in" in line, line
    intact = line.split(" is intact")[0].rsplit(" ", 1)[-1]
    assert intact in (str(ckpts / "last.ckpt"), str(ckpts / "step0000010.ckpt")) and "ckpt_path=auto" in line, line
    assert {p.name: p.read_bytes() for p in ckpts.glob("*.ckpt")} == before  # nothing already written is lost
    assert not list(ckpts.glob(".*.tmp-*"))
    assert (out / "csv" / "metrics.csv").read_text().startswith(rows_before)
    # full from the start: the first file written is refused in one line
    r = subprocess.run([sys.executable, "-m", "blip2_train.cli.train",
                        *train_args(synth, tmp_path / "new", "trainer.max_steps=5")], cwd=REPO,
                       env=clean_env(), capture_output=True, text=True, timeout=LIMIT,
                       preexec_fn=_file_size_limit(64))
    line = one_line(r)
    assert "file size limit" in line and "free space and run again" in line, line
