"""The GPU check kit: wheels of what the GPU machine's Python lacks (run_scripts/gpu_kit.txt), for ITS Python
(CPython 3.12, manylinux x86_64), plus a wheel of blip2-train itself. Standard library only: `install` runs on
the GPU machine before anything else is there.

    python run_scripts/gpu_kit.py build [--out .gpu-kit] [--python 3.12]   # here, with a package registry (`make gpu-kit`)
    python run_scripts/gpu_kit.py check [--kit .gpu-kit]     # does the kit + the machine's packages resolve?
    python3 run_scripts/gpu_kit.py install --kit .gpu-kit --work DIR   # there, offline (run_scripts/gpu_check.sh)

The kit holds requirements.txt (what `install` asks pip for: pyproject's ranges of the kit's top-level
packages), manifest.json (each file with its size and sha256, the source hash of the blip2-train wheel) and the
wheels.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIST = REPO / "run_scripts" / "gpu_kit.txt"
MAX_BYTES = 40 * 2**20
# the GPU machine's interpreter
PYTHON = "3.12"


def target(python: str = PYTHON) -> list[str]:
    """pip's options that pick wheels for CPython `python` on x86_64 Linux (not this interpreter)."""
    return ["--python-version", python, "--implementation", "cp", "--abi", "cp" + python.replace(".", ""),
            "--only-binary=:all:", *[a for p in ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64",
                                                 "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                                 "manylinux_2_5_x86_64", "manylinux1_x86_64")
                                     for a in ("--platform", p)]]


# the dev extra's packages the check runs (pytest-xdist is used where the machine has it)
CHECK_DEV = ("pytest", "pytest-timeout")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_list(path: Path = LIST) -> dict[str, dict]:
    """gpu_kit.txt -> {"kit": {name: {"pin", "build"}}, "machine": {name: {"pin"}}, "skip": {name: {"why"}}}."""
    out: dict[str, dict] = {"kit": {}, "machine": {}, "skip": {}}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, rest = line.split(None, 1)
        if kind == "skip":
            name, _, why = rest.partition(" ")
            out["skip"][norm(name)] = {"why": why.strip()}
            continue
        pin, *flags = rest.split()
        name = norm(pin.split("==")[0])
        out[kind][name] = {"pin": pin, "build": "build" in flags, "slim": "slim" in flags}
    return out


def pyproject_requirements() -> tuple[list[str], list[str]]:
    """(runtime dependencies, dev extra) of blip2-train, as written in pyproject.toml."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]), list(project["optional-dependencies"]["dev"])


def req_name(req: str) -> str:
    return norm(re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0])


def classify() -> dict[str, list[str]]:
    """pyproject's requirements by where the GPU machine gets them: {"kit": [...], "machine": [...], "skip": [...],
    "unknown": [...]} (unknown: a dependency added to pyproject.toml without a line in gpu_kit.txt)."""
    lists = read_list()
    deps, dev = pyproject_requirements()
    out: dict[str, list[str]] = {"kit": [], "machine": [], "skip": [], "unknown": []}
    for req in deps + [r for r in dev if req_name(r) in CHECK_DEV] + [r for r in dev if req_name(r) not in CHECK_DEV]:
        name = req_name(req)
        where = next((k for k in ("kit", "machine", "skip") if name in lists[k]), "unknown")
        out[where].append(req)
    return out


def source_hash(root: Path = REPO) -> str:
    """sha256 over blip2_train/ and conf/ (paths and bytes, no caches): which tree a package wheel was built from."""
    h = hashlib.sha256()
    for top in ("blip2_train", "conf"):
        for p in sorted((root / top).rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc"):
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


# `slim` wheels: the native libraries the GPU machine cannot load (other CUDA majors, ROCm, XPU) left out, so the
# kit stays under MAX_BYTES; bitsandbytes picks its library by torch.version.cuda (12.6 - 13.x kept)
SLIM_DROP = {"bitsandbytes": re.compile(r"libbitsandbytes_(cuda11\d|cuda12[0-5]|rocm\d+|xpu\d+)\.so$")}


def slim_wheel(whl: Path, drop: re.Pattern) -> int:
    """Rewrite `whl` without the members `drop` matches (their RECORD lines too); -> bytes saved."""
    before = whl.stat().st_size
    tmp = whl.with_suffix(".slim")
    with zipfile.ZipFile(whl) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if drop.search(info.filename):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not drop.search(line.split(b",", 1)[0].decode()))
            dst.writestr(info, data)
    tmp.replace(whl)
    return before - whl.stat().st_size


def build(out: Path, python: str = PYTHON) -> dict:
    """Download / build every wheel into a fresh folder, then put it in place of `out`. `python`: the CPython
    version the kit is for (another than the GPU machine's only to install it into this machine's Python)."""
    lists = read_list()
    unknown = classify()["unknown"]
    if unknown:
        raise SystemExit(f"pyproject.toml requires {unknown}, which run_scripts/gpu_kit.txt does not place "
                         "(kit / machine / skip)")
    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=".gpu-kit-", dir=out.resolve().parent))
    try:
        binary = [v["pin"] for v in lists["kit"].values() if not v["build"]]
        pip("download", "--no-deps", *target(python), "-d", str(tmp), *binary)
        for name, v in lists["kit"].items():
            if v.get("slim"):
                for whl in tmp.glob(f"{name.replace('-', '_')}-*.whl"):
                    print(f"  {whl.name}: {slim_wheel(whl, SLIM_DROP[name]) / 2**20:.1f} MiB of other "
                          "platforms' libraries left out", flush=True)
        sdists = [v["pin"] for v in lists["kit"].values() if v["build"]]
        names = ",".join(req_name(p) for p in sdists)
        # DS_BUILD_OPS=0: no DeepSpeed op compiled here (none is used; any other JIT-compiles there, with nvcc)
        pip("wheel", "--no-deps", "--no-cache-dir", "--no-binary", names, "-w", str(tmp), *sdists,
            env={"DS_BUILD_OPS": "0"})
        for whl in tmp.glob("*.whl"):
            cp = "-cp" + python.replace(".", "") + "-"
            if not whl.name.endswith(("-py3-none-any.whl", "-py2.py3-none-any.whl")) and cp not in whl.name \
                    and "-py3-none-manylinux" not in whl.name:
                raise SystemExit(f"{whl.name} is not for CPython {python} on x86_64 Linux")
        # blip2-train from a copy of the tree (no build/ or egg-info left in the working tree)
        with tempfile.TemporaryDirectory() as src:
            for name in ("pyproject.toml", "README.md", "blip2_train", "conf"):
                p = REPO / name
                if p.is_dir():
                    shutil.copytree(p, Path(src) / name, symlinks=True,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    shutil.copy2(p, Path(src) / name)
            pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp), src)
        c = classify()
        (tmp / "requirements.txt").write_text(
            "# what run_scripts/gpu_kit.py install asks pip for (pyproject.toml's ranges), offline from this folder;\n"
            "# blip2-train itself is installed with --no-deps (its wandb / pycocoevalcap / matplotlib are not needed)\n"
            + "".join(f"{r}\n" for r in c["kit"]))
        files = sorted(tmp.glob("*.whl"))
        manifest = {"built": time.strftime("%Y-%m-%d %H:%M:%S %z"), "for": f"CPython {python}, manylinux x86_64",
                    "source_hash": source_hash(), "requirements": c["kit"],
                    "left_out": {k: v["why"] for k, v in lists["skip"].items()},
                    "files": {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in files},
                    "total_bytes": sum(f.stat().st_size for f in files), "build_seconds": round(time.time() - t0, 1),
                    "deepspeed_build": "pip wheel --no-deps --no-binary deepspeed (sdist), DS_BUILD_OPS=0"}
        if manifest["total_bytes"] > MAX_BYTES:
            raise SystemExit(f"the kit holds {manifest['total_bytes'] / 2**20:.1f} MiB, over its 40 MiB")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"{out}: {len(manifest['files'])} wheels, {manifest['total_bytes'] / 2**20:.1f} MiB "
          f"({manifest['build_seconds']} s)")
    return manifest


def stub_wheel(folder: Path, pin: str) -> Path:
    """An empty wheel NAME==VERSION: a package the GPU machine already holds, for pip's resolver."""
    name, version = pin.split("==")
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_kit\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{k},sha256={base64.urlsafe_b64encode(hashlib.sha256(v.encode()).digest()).rstrip(b'=').decode()},"
                     f"{len(v.encode())}\n" for k, v in files.items()) + f"{info}/RECORD,,\n"
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in {**files, f"{info}/RECORD": record}.items():
            z.writestr(k, v)
    return path


def check(kit: Path, python: str = PYTHON) -> dict:
    """pip resolves requirements.txt for CPython 3.12 from the kit alone plus empty stand-ins of the machine's
    packages (no index, no config, --dry-run, --target: installed packages here play no part), every kit line has
    exactly one wheel, blip2-train's wheel is there, the kit is under 40 MiB. -> {"install": {name: version}, ...}"""
    lists = read_list()
    problems = []
    wheels = sorted(kit.glob("*.whl"))
    by_name: dict[str, list[str]] = {}
    for w in wheels:
        by_name.setdefault(norm(w.name.split("-")[0]), []).append(w.name)
    for name in list(lists["kit"]) + ["blip2-train"]:
        if len(by_name.get(name, [])) != 1:
            problems.append(f"{name}: {by_name.get(name, [])} (want one wheel)")
    extra = sorted(set(by_name) - set(lists["kit"]) - {"blip2-train"})
    if extra:
        problems.append(f"wheels not in gpu_kit.txt: {extra}")
    total = sum(w.stat().st_size for w in wheels)
    if total > MAX_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB, over 40 MiB")
    with tempfile.TemporaryDirectory() as d:
        stubs = Path(d) / "machine"
        stubs.mkdir()
        for v in lists["machine"].values():
            stub_wheel(stubs, v["pin"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PIP_CONFIG_FILE"] = os.devnull  # this machine's mirrors and find-links play no part
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index",
               "--find-links", str(kit), "--find-links", str(stubs), *target(python), "--target", str(Path(d) / "t"),
               "--report", str(Path(d) / "report.json"), "--disable-pip-version-check", "-r", str(kit / "requirements.txt")]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            problems.append("pip could not resolve: " + (r.stderr.strip().splitlines() or ["?"])[-1])
            install = {}
        else:
            report = json.loads((Path(d) / "report.json").read_text())
            install = {norm(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    from_kit = {k: v for k, v in install.items() if k in lists["kit"]}
    unused = sorted(set(lists["kit"]) - set(from_kit))
    if unused and not problems:
        problems.append(f"kit wheels nothing requires: {unused}")
    return {"ok": not problems, "problems": problems, "from_kit": from_kit,
            "from_machine": {k: v for k, v in install.items() if k in lists["machine"]}, "bytes": total,
            "wheels": len(wheels)}


def install(kit: Path, work: Path, method: str = "auto") -> dict:
    """On the GPU machine, offline, into this interpreter: pip resolves requirements.txt against what is installed
    and the kit (so nothing already there is replaced unless pyproject's range excludes it), then blip2-train
    --no-deps. If that fails (or method="target"): each kit wheel whose package is absent, --no-deps, into
    WORK/site, for PYTHONPATH."""
    import importlib.metadata as md

    base = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(kit), "--no-cache-dir",
            "--disable-pip-version-check", "--no-input"]
    package = sorted(kit.glob("blip2_train-*.whl"))
    tried = []
    r = None
    if method == "auto":
        r = subprocess.run([*base, "-r", str(kit / "requirements.txt")], capture_output=True, text=True)
        tried.append({"how": "pip install -r requirements.txt (resolved against the installed packages)",
                      "rc": r.returncode, "tail": (r.stdout + r.stderr)[-1500:]})
    if r is not None and r.returncode == 0:
        r = subprocess.run([*base, "--no-deps", *map(str, package)], capture_output=True, text=True)
        tried.append({"how": "pip install --no-deps blip2-train", "rc": r.returncode, "tail": (r.stdout + r.stderr)[-800:]})
        if r.returncode == 0:
            return {"method": "into this python", "python": sys.executable, "tried": tried, "pythonpath": None}
    site = work / "site"
    absent = []
    for w in sorted(kit.glob("*.whl")):
        name = w.name.split("-")[0]
        try:
            md.version(name)
            if name != "blip2_train":
                continue
        except md.PackageNotFoundError:
            pass
        absent.append(str(w))
    r = subprocess.run([*base, "--no-deps", "--no-compile", "--target", str(site), *absent], capture_output=True,
                       text=True)
    tried.append({"how": f"pip install --no-deps --target {site} (the {len(absent)} kit wheels whose package is absent)",
                  "rc": r.returncode, "tail": (r.stdout + r.stderr)[-1500:]})
    if r.returncode != 0:
        raise SystemExit(json.dumps(tried, indent=1))
    return {"method": "--target fallback", "python": sys.executable, "tried": tried, "pythonpath": str(site)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--out", default=str(REPO / ".gpu-kit"))
    b.add_argument("--python", default=PYTHON, help="the CPython version the kit is for (the GPU machine's: 3.12)")
    c = sub.add_parser("check")
    c.add_argument("--kit", default=str(REPO / ".gpu-kit"))
    c.add_argument("--python", default=PYTHON)
    i = sub.add_parser("install")
    i.add_argument("--kit", default=str(REPO / ".gpu-kit"))
    i.add_argument("--work", required=True)
    i.add_argument("--json", help="write what was done here")
    i.add_argument("--method", choices=["auto", "target"], default="auto",
                   help="target: skip the resolved install, go straight to the --target folder")
    a = p.parse_args(argv)
    if a.cmd == "build":
        build(Path(a.out), a.python)
        r = check(Path(a.out), a.python)
        print(json.dumps(r, indent=1))
        return 0 if r["ok"] else 1
    if a.cmd == "check":
        r = check(Path(a.kit), a.python)
        print(json.dumps(r, indent=1))
        return 0 if r["ok"] else 1
    r = install(Path(a.kit), Path(a.work), a.method)
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1))
    if r["pythonpath"]:
        (Path(a.work) / "pythonpath").write_text(r["pythonpath"])
    print(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
