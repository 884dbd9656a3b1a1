"""Imports point one way. Each package of blip2_train has a layer, and a module may import only from its own layer
or layers below it:

    0 utils  <-  1 distributed  <-  2 config, models  <-  3 data  <-  4 lit  <-  5 eval, demo  <-  6 bench, cli, api

`demo/` (the synthetic world and its stand-ins) and `bench/` (benchmarks) are leaves: nothing from utils to eval
imports them. Only the face of the package (its version, `load`, the `python -m` entry points) sits at its root.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "blip2_train"
LAYERS = {"utils": 0, "distributed": 1, "config": 2, "models": 2, "data": 3, "lit": 4, "eval": 5, "demo": 5,
          "bench": 6, "cli": 6, "api": 6,
          # `python -m blip2_train.train` / `.evaluate` start the CLI; conf/ (the shipped configs) imports nothing
          "train": 6, "evaluate": 6, "conf": 0}
LEAVES = {"demo", "bench"}
FACE = {"__init__.py", "api.py", "train.py", "evaluate.py"}

# Every module and its layer: a new module is placed here on purpose, not by accident.
MODULES = {
    "utils": ["checkpoints", "errors", "hashing", "io", "loggers", "syncs"],
    "distributed": ["collectives", "deepspeed", "fsdp", "launch"],
    "config": ["compose", "ranges", "run_dir", "schemas"],
    "models": ["adapters", "build_instruct", "build_stage1", "build_stage2", "card", "convert", "export", "instruct",
               "llm", "losses", "quant", "stage1", "stage2", "tokenizer", "vision"],
    "data": ["annotations", "captions", "collate", "datamodule", "decode", "eval_sets", "image_folder", "instruct",
             "replay", "shards", "stream", "transforms", "vqa"],
    "lit": ["base", "checkpoint_io", "instruct", "optim", "periodic", "progress", "signal_stop", "snapshot", "stage1",
            "stage2"],
    "eval": ["callback", "captioning", "classify", "embedding", "generation", "retrieval", "runner", "vqa",
             "metrics.captioning", "metrics.retrieval", "metrics.vqa"],
    "demo": ["llm", "report", "vit", "world", "world_vqa"],
    "bench": ["data", "doc", "eval", "levers", "memory", "plan", "retrieval_baseline", "train"],
    "cli": ["app", "bench", "classify", "embed", "errors", "evaluate", "export", "generate", "log", "run_lock",
            "train"],
}


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
            # `from blip2_train import demo` names the package in the alias
            yield from ((node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "blip2_train")
        elif isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)


def package_modules() -> list[tuple[str, ...]]:
    """Every module under blip2_train/ as its dotted parts after the package, __init__ files left out."""
    return sorted(p.relative_to(PACKAGE).with_suffix("").parts for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py" and "conf" not in p.relative_to(PACKAGE).parts)


def test_every_module_has_its_place():
    listed = {(pkg, *m.split(".")) for pkg, mods in MODULES.items() for m in mods}
    found = {parts for parts in package_modules() if len(parts) > 1}
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but gone: {sorted(listed - found)}"


def test_only_the_face_at_the_package_root():
    root = {p.name for p in PACKAGE.glob("*.py")}
    assert root == FACE, f"modules at the package root beyond its face: {sorted(root - FACE)}"


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


def test_demo_and_bench_are_leaves():
    """Nothing from utils to eval imports the demo's props or the benchmarks."""
    into_leaves = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        if len(rel.parts) < 2 or rel.parts[1] not in LAYERS or LAYERS[rel.parts[1]] > LAYERS["eval"] \
                or rel.parts[1] in LEAVES:
            continue
        for lineno, module in imports_of(path):
            parts = module.split(".")
            if parts[0] == "blip2_train" and len(parts) > 1 and parts[1] in LEAVES:
                into_leaves.append(f"{rel}.py:{lineno} imports {module}")
    assert not into_leaves, "imports of a leaf package:\n" + "\n".join(into_leaves)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from blip2_train.config.compose import compose\nimport blip2_train.utils.io\n"
                   "from blip2_train import demo\n")
    assert [layer_of(m) for _, m in imports_of(bad)] == [2, 0, None, 5]
