"""Imports point one way: utils <- models <- data <- lit <- eval <- cli. A module may import only from its own
layer or layers to its left; this test fails on the first import that points up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "blip2_train"
LAYERS = {"utils": 0, "models": 1, "data": 2, "lit": 3, "eval": 4, "cli": 5,
          # top-level modules: the demo report reads metrics (eval level); the benchmarks and the Python API
          # drive everything (cli)
          "report": 4, "bench_train": 5, "bench_memory": 5, "api": 5,
          # `python -m blip2_train.train` / `.evaluate` start the CLI; conf/ (the shipped configs) imports nothing
          "train": 5, "evaluate": 5, "conf": 0}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "blip2_train" or len(parts) < 2:
        return None
    if parts[1] not in LAYERS:
        raise AssertionError(f"blip2_train.{parts[1]} has no layer: add it to LAYERS")
    return LAYERS[parts[1]]


def imports_of(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)


def test_imports_point_one_way():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        mine = layer_of(".".join(rel.parts)) if len(rel.parts) > 1 and rel.parts[1] != "__init__" else None
        if mine is None:
            continue
        for lineno, module in imports_of(path):
            theirs = layer_of(module)
            if theirs is not None and theirs > mine:
                upward.append(f"{rel}.py:{lineno} imports {module}")
    assert not upward, "imports that point up:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from blip2_train.cli.common import compose\nimport blip2_train.utils.io\n")
    assert [layer_of(m) for _, m in imports_of(bad)] == [5, 0]
