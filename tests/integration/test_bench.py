"""`blip2-bench` as a user runs it, at tiny size: each benchmark prints its figures (and writes them into the
markdown file it is given)."""

from __future__ import annotations

import json

import pytest


def test_bench_data_runs_and_times_both_resume_skips(synth, tmp_path, capsys):
    """`blip2-bench data --resume-skip N` at tiny size: decode-only, the loader, and a resume that reads the
    skipped tar members beside one replayed over sample positions, written into the given markdown file."""
    from blip2_train.cli.bench import main

    doc = tmp_path / "bench.md"
    assert main(["data", "--shards", str(synth["train_shards"]), "--tokenizer", str(synth["tokenizer"]),
                 "--batches", "3", "--batch-size", "4", "--image-size", "32", "--rounds", "1", "--resume-skip", "6",
                 "--doc", str(doc)]) == 0
    text = doc.read_text()
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| resume: skipping 6 batches")]
    assert len(rows) == 2 and "read, not decoded" in rows[0][1] and "replayed" in rows[1][1], text
    assert all(float(r[2]) > 0 for r in rows), text
    assert "replaying" in text and "Resume at real size" in text


@pytest.mark.parametrize("stage,model,extra", [(1, "tiny", []), (2, "tiny", ["--llm", "tiny"])])
def test_bench_train_runs_on_cpu(tmp_path, capsys, stage, model, extra):
    from blip2_train.cli.bench import main

    doc = tmp_path / "bench.md"
    assert main(["train", "--stage", str(stage), "--arch", model, "--batch-size", "4", "--image-size", "32",
                 "--steps", "2", "--warmup", "1", "--doc", str(doc), *extra]) == 0
    text = doc.read_text()
    assert "MFU" in text and "samples/s" in text and "Q-Former" in text
    out = capsys.readouterr().out

    r = json.loads(out[out.index("{"):])
    assert r["flops_per_sample"] > 0 and 0 < r["mfu"] < 1.5 and r["samples_per_s"] > 0
    assert r["breakdown_per_sample"]["Q-Former"] > 0
    if stage == 2:
        assert r["breakdown_per_sample"]["frozen LLM"] > 0


@pytest.mark.parametrize("what,variants", [("lm-loss", ("full-logits", "chunked")), ("itc", ("all-texts", "blocked"))])
def test_bench_memory_measures_both_variants_in_fresh_processes(capsys, what, variants):
    """`blip2-bench memory lm-loss|itc` at a small size: each variant's peak in its own process, ours below the
    naive way's."""
    from blip2_train.cli.bench import main

    small = ["--batch", "4", "--vocab", "20000", "--hidden", "64"] if what == "lm-loss" else \
        ["--images", "256", "--texts", "2000", "--block-mib", "2"]
    assert main(["memory", what, *small]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["what"] == what
    naive, ours = (r[f"{v}_peak_mib"] for v in variants)
    assert 0 <= ours < naive, r
