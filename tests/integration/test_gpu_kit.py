"""The GPU check (run_scripts/gpu_check.sh) and its kit (run_scripts/gpu_kit.py, `make gpu-kit`).

In CI: the whole check as a dry run on the CPU (GPU_CHECK_DEVICE=cpu, tiny sizes, this environment instead of
the kit) under a Python that lacks wandb and pycocoevalcap, as the GPU machine does; every module of the package
imports there, and a feature that needs one of them says so in one line; every dependency in pyproject.toml is
placed (in the kit, on the machine, or not needed by the check).
Marked slow (it needs a package registry): the kit built for CPython 3.12, resolved by pip from the kit plus
stand-ins of the machine's packages, and installed offline into a CPython 3.12 environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from helpers.procs import REPO, clean_env

LACKING = ("wandb", "pycocoevalcap")


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "run_scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def env_for(**extra) -> dict:
    env = {k: v for k, v in clean_env().items() if not k.startswith(("PYTEST_", "GPU_CHECK_"))}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def python_without(tmp_path_factory) -> Path:
    """A virtual environment holding this one's packages (links) except wandb and pycocoevalcap: the GPU machine
    has neither."""
    root = tmp_path_factory.mktemp("venv_without")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    py = root / "bin" / "python"
    dst = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip())
    for key in ("purelib", "platlib"):
        for entry in Path(sysconfig.get_paths()[key]).iterdir():
            top = entry.name.split("-")[0].split(".")[0].lower()
            if top in LACKING or (dst / entry.name).exists():
                continue
            (dst / entry.name).symlink_to(entry)
    r = subprocess.run([str(py), "-c", "import importlib.util as u, torch, blip2_train; "
                        f"print([n for n in {LACKING!r} if u.find_spec(n)])"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
    return py


def test_gpu_check_dry_run_on_cpu_brings_every_step_back(python_without, tmp_path):
    """run_scripts/gpu_check.sh as on the GPU machine, but GPU_CHECK_DEVICE=cpu (tiny sizes) and this environment
    (less wandb and pycocoevalcap) instead of the kit: gpu_check.json holds every step with a status and its
    figures, the DeepSpeed tests are skipped with their reason and not counted as passed, gpu_check.md is the table."""
    gpu_check = load("gpu_check")
    out = tmp_path / "out"
    doc_mtime = (REPO / "docs" / "benchmarks.md").stat().st_mtime
    t0 = time.perf_counter()
    r = subprocess.run(["bash", str(REPO / "run_scripts" / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True,
                       timeout=600, env=env_for(GPU_CHECK_DEVICE="cpu", GPU_CHECK_SKIP_INSTALL="1", OUT=str(out),
                                                GPU_CHECK_PYTHON=str(python_without),
                                                GPU_CHECK_WORK=str(tmp_path / "work")))
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    doc = json.loads((out / "gpu_check.json").read_text())
    steps = doc["steps"]
    assert list(steps) == list(gpu_check.STEPS) and doc["overall"] == "passed", doc["not_passed"]
    assert all(s["status"] for s in steps.values())
    assert steps["install"]["status"] == "skipped" and "GPU_CHECK_SKIP_INSTALL" in steps["install"]["reason"]
    assert all(steps[n]["status"] == "passed" for n in list(gpu_check.STEPS)[1:]), {n: s["status"] for n, s in steps.items()}

    env = steps["env"]["figures"]
    assert env["device_mode"] == "cpu" and env["torch"] and env["versions"]["hydra-core"]
    assert env["versions"]["wandb"] is None and env["versions"]["pycocoevalcap"] is None
    assert not [k for k, v in env["imports"].items() if str(v).startswith("FAILED")], env["imports"]
    for name, llm in (("bench_stage1", None), ("bench_stage2_opt", "tiny"), ("bench_stage2_llama7b", "tiny-llama")):
        f = steps[name]["figures"]
        assert f["llm"] == llm and f["samples_per_s"] > 0 and 0 < f["mfu"] < 1.5 and f["peak_memory_gib"] > 0, f

    tests = steps["gpu_tests"]["figures"]
    by_name = {t["name"]: t for t in tests["tests"]}
    assert tests["counts"] == {"passed": 4, "skipped": 2}, tests["counts"]
    for zero in (2, 3):
        t = by_name[f"test_deepspeed_fit_and_resume[{zero}]"]
        assert t["status"] == "skipped" and "needs CUDA" in t["reason"], t
    recorded = {r["test"]: r for r in tests["records"]}
    assert "needs CUDA" in recorded["deepspeed_zero3"]["skipped"]
    assert recorded["fsdp2_one_device"]["resume_max_rel_diff"] <= 1e-5
    assert recorded["eval_device_vs_cpu"]["max_abs_diff"] == 0

    ev = steps["eval_bench"]["figures"]
    assert ev["metrics_identical"] and ev["batched"]["seconds"] > 0 and ev["baseline"]["seconds"] > 0, ev
    assert "extrapolation" in ev and ev["batched"]["seconds_at_5k_extrapolated"] > 0

    # the speed levers, last: every variant timed and giving eager's losses and gradients
    work = tmp_path / "work"
    assert "=== levers: exit 0" in (out / "gpu_check.log").read_text(), (work / "levers.log").read_text()[-3000:]
    lv = json.loads((work / "levers.json").read_text())
    assert lv["same_result"] and list(lv["variants"]) == ["eager", "sdpa", "sdpa+compile"], lv["mismatches"]
    assert all(v["best_step_s"] > 0 and v["loss_rel_diff"] <= 1e-5 for v in lv["variants"].values()), lv

    table = (out / "gpu_check.md").read_text()
    assert "| step | status | seconds | figures |" in table
    for name in gpu_check.STEPS:
        assert f"| {name} | " in table, table
    # the benches wrote their markdown into the work folder, not into the tree
    assert (REPO / "docs" / "benchmarks.md").stat().st_mtime == doc_mtime
    print(f"dry run: {seconds:.0f} s")


def test_every_module_imports_without_wandb_and_pycocoevalcap(python_without):
    """Every module of the package imports where neither is installed: each import of them is lazy."""
    code = ("import importlib, pkgutil, blip2_train\n"
            "bad = []\n"
            "for m in pkgutil.walk_packages(blip2_train.__path__, 'blip2_train.'):\n"
            "    try:\n"
            "        importlib.import_module(m.name)\n"
            "    except Exception as e:\n"
            "        bad.append(f'{m.name}: {type(e).__name__}: {e}')\n"
            "print(len(bad), bad)\n")
    r = subprocess.run([str(python_without), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=env_for())
    assert r.returncode == 0 and r.stdout.startswith("0 "), r.stdout[-3000:] + r.stderr[-3000:]


def test_captioning_metrics_without_pycocoevalcap_say_so_in_one_line(python_without):
    code = ("from blip2_train.cli.errors import known_error_line\n"
            "from blip2_train.eval.metrics.captioning import score_captions\n"
            "try:\n"
            "    score_captions({1: ['a dog']}, {1: 'a dog'})\n"
            "except Exception as e:\n"
            "    print(known_error_line(e))\n")
    r = subprocess.run([str(python_without), "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=env_for())
    lines = r.stdout.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 1, r.stdout + r.stderr[-2000:]
    assert "need pycocoevalcap" in lines[0] and "pip install pycocoevalcap" in lines[0], lines


def test_wandb_logger_without_wandb_says_so_in_one_line(python_without, synth, tmp_path):
    r = subprocess.run([str(python_without), "-m", "blip2_train.cli.train", "experiment=stage1_pretrain", "preset=tiny",
                        f"paths.data_dir={synth['dir']}", "trainer=cpu", "logger=wandb", "trainer.max_steps=1",
                        f"paths.output_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=env_for())
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "wandb" in errors[0] and any(w in errors[0] for w in ("not installed", "not met", "pip install")), errors[0]


def test_the_kit_list_places_every_dependency_of_the_package():
    """Every requirement of pyproject.toml is in the kit, on the GPU machine, or not needed by the check (a new
    dependency without a line in run_scripts/gpu_kit.txt fails here, not on the GPU machine)."""
    kit = load("gpu_kit")
    placed = kit.classify()
    assert placed["unknown"] == [], placed["unknown"]
    lists = kit.read_list()
    names = [n for section in lists.values() for n in section]
    assert len(names) == len(set(names)), "a package in two sections of gpu_kit.txt"
    assert set(LACKING) <= set(lists["skip"]) and not set(LACKING) & set(lists["kit"])
    assert {"hydra-core", "omegaconf", "webdataset", "deepspeed"} <= set(lists["kit"])
    assert lists["kit"]["deepspeed"]["build"] and lists["kit"]["antlr4-python3-runtime"]["build"]


def python312() -> Path | None:
    """A CPython 3.12 that runs (a pyenv shim may exist and refuse)."""
    cands = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))[::-1]
    if shutil.which("python3.12"):
        cands.append(Path(shutil.which("python3.12")))
    for c in cands:
        if subprocess.run([str(c), "-c", "import venv, ensurepip"], capture_output=True).returncode == 0:
            return c
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_kit_builds_resolves_for_python312_and_installs_offline(tmp_path):
    """`make gpu-kit`'s build (needs a package registry): CPython 3.12 wheels, under 40 MiB, nothing the check does
    not use; pip resolves the kit's requirements from the kit plus empty stand-ins of the GPU machine's packages
    (and no longer does without a wheel the kit needs); the kit installs offline into a CPython 3.12 environment
    holding those stand-ins, leaving them as they were."""
    kit_mod = load("gpu_kit")
    kit = tmp_path / ".gpu-kit"
    r = subprocess.run([sys.executable, str(REPO / "run_scripts" / "gpu_kit.py"), "build", "--out", str(kit)],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    manifest = json.loads((kit / "manifest.json").read_text())
    assert manifest["total_bytes"] < 40 * 2**20 and manifest["source_hash"] == kit_mod.source_hash()
    files = list(manifest["files"])
    assert not [f for f in files if f.startswith(("wandb", "pycocoevalcap", "matplotlib", "torch-"))], files
    assert any(f.startswith("deepspeed-") and f.endswith("-py3-none-any.whl") for f in files), files
    import zipfile

    (pkg,) = kit.glob("blip2_train-*.whl")
    assert "blip2_train/conf/experiment/stage1_pretrain.yaml" in zipfile.ZipFile(pkg).namelist()
    res = kit_mod.check(kit)
    assert res["ok"], res["problems"]
    assert {"deepspeed", "hydra-core", "webdataset", "pydantic-core"} <= set(res["from_kit"])
    assert "torch" in res["from_machine"]

    broken = tmp_path / "broken"
    shutil.copytree(kit, broken)
    next(broken.glob("hjson-*.whl")).unlink()
    bad = kit_mod.check(broken)
    assert not bad["ok"] and any("hjson" in p for p in bad["problems"]), bad

    py = python312()
    if py is None:
        pytest.skip("no CPython 3.12 here to install the kit into")
    venv = tmp_path / "py312"
    subprocess.run([str(py), "-m", "venv", str(venv)], check=True)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for v in kit_mod.read_list()["machine"].values():
        kit_mod.stub_wheel(stubs, v["pin"])
    vpy = str(venv / "bin" / "python")
    offline = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")}, "PIP_CONFIG_FILE": os.devnull}
    subprocess.run([vpy, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(stubs),
                    *sorted(map(str, stubs.glob("*.whl")))], check=True, env=offline)
    # the fallback first: the kit's wheels whose package is absent, into a folder for PYTHONPATH
    r = subprocess.run([vpy, str(REPO / "run_scripts" / "gpu_kit.py"), "install", "--kit", str(kit), "--work",
                        str(tmp_path / "work_target"), "--method", "target"], capture_output=True, text=True,
                       env=offline, timeout=600)
    assert r.returncode == 0 and json.loads(r.stdout)["method"] == "--target fallback", r.stdout + r.stderr[-2000:]
    site = tmp_path / "work_target" / "site"
    assert (site / "deepspeed").is_dir() and (site / "pydantic").is_dir() and not (site / "torch").exists()
    r = subprocess.run([vpy, "-c", "import pydantic, hjson, blip2_train.utils.errors"], capture_output=True, text=True,
                       cwd=tmp_path, env={**offline, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([vpy, str(REPO / "run_scripts" / "gpu_kit.py"), "install", "--kit", str(kit), "--work",
                        str(tmp_path / "work")], capture_output=True, text=True, env=offline, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(r.stdout)["method"] == "into this python"
    # the pure ones import (hydra, omegaconf and webdataset need the machine's real yaml / numpy, stood in here)
    r = subprocess.run([vpy, "-c", "import pydantic, hjson, msgpack, einops, braceexpand, antlr4, json; "
                        "import importlib.metadata as m; print(json.dumps({d: m.version(d) for d in ("
                        "'hydra-core', 'omegaconf', 'webdataset', 'deepspeed', 'blip2-train', 'torch', 'packaging')}))"],
                       capture_output=True, text=True, cwd=tmp_path, env=offline)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    # the kit's versions, and the machine's packages left as they were
    machine = {k: v["pin"].split("==")[1] for k, v in kit_mod.read_list()["machine"].items()}
    assert json.loads(r.stdout) == {"hydra-core": "1.3.8", "omegaconf": "2.3.1", "webdataset": "1.0.2",
                                    "deepspeed": "0.19.8", "blip2-train": "0.1.0", "torch": machine["torch"],
                                    "packaging": machine["packaging"]}


# What the fresh environment of the offline install holds before the kit: torch, lightning and transformers (with
# their own dependencies), and three packages of the GPU machine (gpu_kit.txt's `machine` lines) that the check
# needs and those three do not bring: psutil (deepspeed requires it: without it pip cannot resolve the kit, the
# install falls back to --target and deepspeed does not import), pillow (image decoding; the machine has it
# through scikit-image) and rich (the training progress bar).
FRESH = ("torch", "lightning", "transformers")
MACHINE_EXTRAS = ("psutil", "pillow", "rich")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kit_installs_offline_into_a_fresh_environment_and_the_dry_run_passes(tmp_path):
    """The real offline install, end to end: a fresh virtual environment of THIS interpreter (CPython 3.11 here;
    the GPU machine's is 3.12, whose resolution the test above checks) holding only torch, lightning and
    transformers at this environment's versions, plus MACHINE_EXTRAS; the kit built for that Python; then
    run_scripts/gpu_check.sh as on the GPU machine but on the CPU: its install step puts the kit in with pip
    --no-index (nothing fetched), blip2_train imports, and every step of the dry run passes."""
    import importlib.metadata as md

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    kit = tmp_path / ".gpu-kit"
    r = subprocess.run([sys.executable, str(REPO / "run_scripts" / "gpu_kit.py"), "build", "--out", str(kit),
                        "--python", version], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((kit / "manifest.json").read_text())["for"].startswith(f"CPython {version}")

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    vpy = str(venv / "bin" / "python")
    pins = [f"{name}=={md.version(name).split('+')[0]}" for name in FRESH + MACHINE_EXTRAS]
    # this machine's own pip configuration (its wheel folders / index): creating the environment may fetch
    r = subprocess.run([vpy, "-m", "pip", "install", "-q", "-c", str(REPO / "constraints.txt"), *pins],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    before = json.loads(subprocess.run([vpy, "-c", "import json, importlib.metadata as m; print(json.dumps("
                                        "{d.metadata['Name'].lower(): d.version for d in m.distributions()}))"],
                                       capture_output=True, text=True, check=True).stdout)
    assert "blip2-train" not in before and "hydra-core" not in before and "webdataset" not in before

    out = tmp_path / "out"
    offline = {k: v for k, v in env_for().items() if not k.startswith("PIP_")}
    offline["PIP_CONFIG_FILE"] = os.devnull  # no wheel folder, no index: the kit alone
    r = subprocess.run(["bash", str(REPO / "run_scripts" / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True,
                       timeout=900, env={**offline, "GPU_CHECK_DEVICE": "cpu", "GPU_CHECK_PYTHON": vpy,
                                         "GPU_CHECK_KIT": str(kit), "OUT": str(out),
                                         "GPU_CHECK_WORK": str(tmp_path / "work")})
    doc = json.loads((out / "gpu_check.json").read_text())
    steps = doc["steps"]
    assert r.returncode == 0 and doc["overall"] == "passed", (doc.get("not_passed"), r.stdout[-4000:])
    assert steps["install"]["status"] == "passed", steps["install"]
    installed = json.loads((tmp_path / "work" / "install.json").read_text())
    assert installed["method"] == "into this python" and installed["python"] == vpy, installed
    after = json.loads(subprocess.run([vpy, "-c", "import json, importlib.metadata as m, blip2_train; print(json.dumps("
                                       "{d.metadata['Name'].lower(): d.version for d in m.distributions()}))"],
                                      capture_output=True, text=True, check=True, cwd=tmp_path).stdout)
    assert after["blip2-train"] and after["hydra-core"] == "1.3.8" and after["webdataset"] == "1.0.2"
    # what was there stays as it was: the kit adds, it never replaces torch, lightning or transformers
    for name in ("torch", "lightning", "transformers"):
        assert after[name] == before[name], name
    print(json.dumps({"python": version, "before": len(before), "added": sorted(set(after) - set(before)),
                      "steps": {n: s["status"] for n, s in steps.items()}}))
