"""Evaluation metrics are identical on 1 and 2 processes (real gloo process groups)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from test_ddp import REPO, clean_env


def run(nproc, port, tmp_path, synth, tiny_llms, stage1_export):
    out = tmp_path / f"eval_{nproc}.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                    f"--master_port={port}", str(REPO / "tests" / "ddp_eval_worker.py"), str(out),
                    str(synth["tokenizer"]), str(synth["ann"]["test"]), str(synth["root"]), str(tiny_llms["opt"]),
                    str(stage1_export)], check=True, cwd=REPO, env=clean_env(), timeout=300)
    return json.loads(out.read_text())


def test_metrics_identical_on_one_and_two_processes(tmp_path, synth, tiny_llms, stage1_export):
    one = run(1, 29541, tmp_path, synth, tiny_llms, stage1_export)
    two = run(2, 29542, tmp_path, synth, tiny_llms, stage1_export)
    assert one["retrieval"].keys() == two["retrieval"].keys() and "txt_r1" in one["retrieval"]
    for k, v in one["retrieval"].items():
        assert two["retrieval"][k] == pytest.approx(v, abs=1e-9), k
    assert one["predictions"] == two["predictions"]
    assert len(one["predictions"]) == 24
    for k, v in one["caption"].items():
        assert two["caption"][k] == pytest.approx(v, abs=1e-9), k
