"""`blip2-bench levers` as a user runs it, at tiny size: eager, SDPA and SDPA + a compiled Q-Former each run a
stage-1 step, give the same losses and gradients to fp32 rounding, and the table lands in the markdown file."""

from __future__ import annotations

import json

from helpers.procs import run


def test_levers_times_each_variant_and_keeps_the_result(tmp_path):
    doc, out = tmp_path / "bench.md", tmp_path / "levers.json"
    r = run("bench", ["levers", "--size", "tiny", "--rounds", "1", "--steps", "1", "--device", "cpu",
                      "--doc", str(doc), "--json", str(out)], timeout=300)
    res = json.loads(out.read_text())
    assert res["same_result"] and res["mismatches"] == []
    assert list(res["variants"]) == ["eager", "sdpa", "sdpa+compile"]
    losses = {v: row["losses"] for v, row in res["variants"].items()}
    for v, row in res["variants"].items():
        assert row["best_step_s"] > 0 and row["samples_per_s"] > 0, row
        # ITC + ITM + LM and each part: eager's, to fp32 rounding; gradients too
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(losses[v], losses["eager"])), losses
        assert row["grad_rel_diff"] <= 1e-4, row
        # the model's step (three Q-Former passes, hard negatives, losses, backward, AdamW) reads nothing back
        assert row["host_syncs"] == 0, row["host_sync_sites"]
    assert res["variants"]["sdpa+compile"]["first_step_s"] > res["variants"]["sdpa"]["best_step_s"]  # it compiled
    text = doc.read_text()
    assert "<!-- bench:levers-cpu-tiny -->" in text and "| sdpa+compile |" in text
    assert "Command: `blip2-bench levers --size tiny" in text
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("levers: 3 variants") and "same result in every variant" in last and str(doc) in last
