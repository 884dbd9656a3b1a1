"""The entry points behave as Hydra apps (`--cfg`, `--resolve`, `--info`, `-m` sweeps, launcher configs,
`--config-dir`, Hydra's run directory, `python -m blip2_train.train`), the configs ship in the package (a wheel
installed in a fresh venv outside the repository composes every experiment and trains), and the structured-config
schemas refuse wrong types and unknown keys at composition, in one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from blip2_train.config.compose import register
from helpers.procs import summary_rows
from helpers.tiny import REPO, tiny_cli


# Import the targets (torch, transformers, lightning) now, not first inside a capsys test: some of those libraries
# bind a handler to the sys.stderr of their import time, which capsys closes after its test.
register()


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "BLIP2_", "PL_", "TORCHELASTIC",
                                "HYDRA_FULL_ERROR", "_BLIP2"))}
    env.update({"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", **extra})
    return env


def app(*args, module="blip2_train.cli.train", cwd=REPO, python=sys.executable, timeout=300, env=None):
    return subprocess.run([python, "-m", module, *args], cwd=cwd, env=clean_env(**(env or {})), capture_output=True,
                          text=True, timeout=timeout)


def inproc(capsys, *args, module="train"):
    """The console entry point called in this process (no interpreter start): (exit status, stdout, stderr)."""
    import importlib

    rc = importlib.import_module(f"blip2_train.cli.{module}").main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def small_train(synth, *over):
    return ["experiment=stage1_pretrain", *tiny_cli(synth, "trainer.max_steps=2", "data.batch_size=4",
                                                    "eval.enabled=false", *over)]


def test_cfg_job_prints_the_composed_config_and_resolve_resolves_it(synth, capsys):
    rc, out, err = inproc(capsys, "experiment=caption_coco_eval", "preset=tiny", "--cfg", "job", module="evaluate")
    assert rc == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["eval"]["kind"] == "caption" and cfg["model"]["text"]["prompt"] == "a photo of"
    assert "${" in out  # unresolved without --resolve
    rc, out, err = inproc(capsys, "experiment=caption_coco_eval", "preset=tiny", f"paths.data_dir={synth['dir']}",
                          "paths.stage2_checkpoint=/ckpt/stage2", "--cfg", "job", "--resolve", module="evaluate")
    assert rc == 0, err
    cfg = yaml.safe_load(out)
    assert "${" not in out and cfg["model"]["llm"] == "/ckpt/stage2"
    assert cfg["data"]["eval_set"]["annotation"] == f"{synth['dir']}/coco/annotations/coco_karpathy_test.json"
    # an unknown key is still one line, exit 2, under --cfg too
    rc, out, err = inproc(capsys, "experiment=caption_coco_eval", "data.batch_sze=3", "--cfg", "job", module="evaluate")
    assert rc == 2 and err.strip().count("\n") == 0 and "data.batch_sze" in err, err


def test_info_and_help_name_the_packaged_configs(capsys):
    rc, out, err = inproc(capsys, "--info", "searchpath")
    assert rc == 0 and "pkg://blip2_train.conf" in out, out + err
    shown = [line for line in (out + err).splitlines() if "pkg://blip2_train.conf" in line]
    assert len(shown) == 1, out + err  # each line once, not again through the log
    rc, out, err = inproc(capsys, "--help")
    assert rc == 0 and "blip2-train" in out and "stage1_pretrain" in out
    section = out.split("(README: ")[1].split(")")[0]  # the README section --help points to exists
    assert f"## {section}\n" in (REPO / "README.md").read_text(), section


def test_submitit_slurm_launcher_config_composes(capsys):
    """`hydra/launcher=slurm` (ours, on hydra-submitit-launcher's submitit_slurm) composes; it is not run."""
    rc, out, err = inproc(capsys, "experiment=stage1_pretrain", "hydra/launcher=slurm", "hydra.launcher.nodes=2",
                          "hydra.launcher.partition=gpu", "--cfg", "hydra", "--resolve")
    assert rc == 0, err
    launcher = yaml.safe_load(out)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 8, 8)
    assert launcher["partition"] == "gpu" and launcher["max_num_timeout"] > 0
    assert "export SLURM_KILL_BAD_EXIT=1" in launcher["setup"]
    rc, out, err = inproc(capsys, "-m", "experiment=stage1_pretrain", "--cfg", "job")  # Hydra's usage errors: one line
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and errors[0].startswith("error: Only one of"), err


def test_multirun_sweep_of_lightning_launched_ddp_jobs(synth, tmp_path):
    """`-m` with strategy=ddp trainer.devices=2 and no launcher: each job's rank 1 is started by Lightning, which
    re-runs sys.argv: it must run that job (not the sweep again) in that job's directory. The second job starts
    clean (no LOCAL_RANK / process group left by the first) and both jobs share one sweep directory. The
    experiment is the user's own (--config-dir): the rank processes compose from it too."""
    user = tmp_path / "conf"
    (user / "experiment").mkdir(parents=True)
    (user / "experiment" / "my_stage1.yaml").write_text(
        "# @package _global_\ndefaults:\n  - stage1_pretrain\n  - _self_\nmodel:\n  temp: 0.08\n")
    args = [a if a != "experiment=stage1_pretrain" else "experiment=my_stage1" for a in
            small_train(synth, "data.batch_size=4,6", "trainer.devices=2", "strategy=ddp", f"paths.log_dir={tmp_path}")]
    r = app("-m", "--config-dir", str(user), *args)
    assert r.returncode == 0, r.stderr[-3000:]
    sweeps = list((tmp_path / "stage1_pretrain" / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir())
    assert [j.name for j in jobs] == ["0", "1"], r.stdout
    sizes = [yaml.safe_load((j / "config.yaml").read_text())["data"]["batch_size"] for j in jobs]
    assert sizes == [4, 6]
    assert all(yaml.safe_load((j / "config.yaml").read_text())["model"]["temp"] == 0.08 for j in jobs)
    members = re.findall(r"GLOBAL_RANK: (\d), MEMBER: \d/2", r.stdout + r.stderr)
    assert set(members) == {"0", "1"} and members.count("0") == members.count("1"), members  # 2 ranks per job
    for j in jobs:  # each job, wrote its metrics and Hydra's record of its overrides, once
        metrics = json.loads((j / "metrics.json").read_text())
        assert metrics["global_step"] == 2, metrics
        assert f"data.batch_size={sizes[int(j.name)]}" in (j / ".hydra" / "overrides.yaml").read_text()
        assert sorted(p.name for p in (j / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
        assert not (j / "multirun").exists() and not any(j.glob("*/metrics.json"))


def test_added_keys_and_typos_in_target_groups_are_one_line(synth, capsys, monkeypatch, tmp_path):
    """`+trainer.foo=1` bypasses the schema: refused before any work, naming the target. A typo's hint does not
    suggest `+` for a target's arguments. HYDRA_FULL_ERROR=0 is not a request for tracebacks."""
    monkeypatch.chdir(tmp_path)  # paths.root_dir: nothing is written under the repository
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    rc, _, err = inproc(capsys, *small_train(synth, "+trainer.foo=1"))
    assert rc == 2 and "Traceback" not in err, err
    assert "unknown config key 'trainer.foo': lightning.pytorch.Trainer takes no argument 'foo'" in err
    rc, _, err = inproc(capsys, *small_train(synth, "data.bach_size=4"))
    assert rc == 2 and "'data.bach_size'" in err and "+data" not in err and "Traceback" not in err, err


def test_launcher_run_id_is_shared_by_the_ranks_of_one_launch(monkeypatch):
    """Every rank of one launch names the same run directory: SLURM job.step (two srun steps of one allocation
    are two runs), torchrun's rendezvous id, and for torchrun without one ("none") its agent's start time, which
    all of the node's ranks share (here: two children of this process, started apart)."""
    import time

    from blip2_train.config.run_dir import launcher_run_id

    for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    assert launcher_run_id() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launcher_run_id() == "abc"
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert launcher_run_id() == "77"
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert launcher_run_id() == "77.3"
    env = clean_env(TORCHELASTIC_RUN_ID="none")
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    code = "from blip2_train.config.run_dir import launcher_run_id; print(launcher_run_id())"
    ids = []
    for _ in range(2):
        ids.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout.strip())
        time.sleep(1.1)
    assert ids[0] == ids[1] and ids[0] != "None", ids


def test_torchrun_across_nodes_without_rdzv_id_is_refused(synth, tmp_path):
    """Several nodes launched by torchrun without --rdzv-id: each node's agent has its own start time, so the
    nodes would write to different run directories. Refused in one line; paths.output_dir lets it run."""
    env = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    r = app(*small_train(synth), env=env, cwd=tmp_path)
    assert r.returncode == 2 and "--rdzv-id" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert not (tmp_path / "outputs").exists()
    r = app(*small_train(synth, f"paths.output_dir={tmp_path / 'run'}"), env=env, cwd=tmp_path)
    # past the run directory (this fake 4-rank world then stops at the Trainer, which finds no peers)
    assert "--rdzv-id" not in r.stderr and "instantiating <blip2_train.data" in r.stderr, r.stderr[-3000:]


def test_run_directory_is_hydras_and_chdir_keeps_paths_relative_to_the_start(synth, tmp_path):
    """hydra.run.dir places the run; with hydra.job.chdir=true the shipped relative paths (data/, outputs/) are
    still the starting directory's: preset=tiny finds <cwd>/data/synthetic."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic").symlink_to(synth["dir"])
    over = [a for a in small_train(synth) if not a.startswith("paths.data_dir=")]
    r = app(*over, "hydra.job.chdir=true", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = summary_rows(r.stdout)
    run = Path(rows["run"])
    assert run.parent == tmp_path / "outputs" / "stage1_pretrain" and (run / "metrics.json").is_file()
    # the summary ends the output: the main figures, where things went, and the next command, which runs
    assert r.stdout.strip().splitlines()[-1].startswith("  next:") and "train/loss" in r.stdout
    assert rows["metrics"] == str(run / "metrics.json") and rows["checkpoint"].endswith("last.ckpt (step 2)")
    tool, *args = rows["next"].split()
    assert tool == "blip2-export"
    e = subprocess.run([sys.executable, "-m", "blip2_train.cli.export", *args], cwd=tmp_path, env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0 and (run / "export" / "config.json").is_file(), e.stderr[-3000:]
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "stage1_pretrain.log").is_file()
    r = app(*small_train(synth, f"hydra.run.dir={tmp_path / 'here'}"), module="blip2_train.train")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "here" / "metrics.json").is_file()


def test_user_config_dir_adds_experiments(tmp_path, capsys):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "my_caption.yaml").write_text(
        "# @package _global_\ndefaults:\n  - caption_coco_eval\n  - _self_\nmodel:\n  text:\n    prompt: a picture of\n")
    rc, out, err = inproc(capsys, "--config-dir", str(tmp_path), "experiment=my_caption", "--cfg", "job",
                          module="evaluate")
    assert rc == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["model"]["text"]["prompt"] == "a picture of" and cfg["eval"]["kind"] == "caption"


def test_a_refused_job_leaves_no_directory(synth, tmp_path):
    r = app(*small_train(synth, "data.batch_size=0", f"paths.output_dir={tmp_path / 'run'}"))
    assert r.returncode == 2 and "data.batch_size" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_schemas_follow_the_targets_signatures():
    """A schema is generated from its target: every parameter is a key with the signature's type; a parameter of
    a type no config holds is left to the target's default."""
    import inspect

    from hydra.utils import get_object
    from omegaconf import OmegaConf

    from blip2_train.config.schemas import PASSED_AT_INSTANTIATION, SCHEMAS, schema_for

    for entries in SCHEMAS.values():
        for target in entries.values():
            schema = OmegaConf.structured(schema_for(target))
            obj = get_object(target)
            params = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters
            wanted = {n for n, p in params.items() if n != "self" and n not in PASSED_AT_INSTANTIATION.get(target, set())
                      and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
            assert set(schema) - {"_target_"} <= wanted and schema._target_ == target
            if target.startswith("blip2_train."):
                assert set(schema) - {"_target_"} == wanted, target  # ours: every parameter is configurable
    s = OmegaConf.structured(schema_for("blip2_train.data.datamodule.Blip2DataModule"))
    with pytest.raises(Exception, match="could not be converted to Integer"):
        s.batch_size = "abc"


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """The wheel built from this checkout, installed (no dependencies) into a fresh venv outside the repository.
    Its dependencies come from this environment's site-packages through a .pth line, which does not run this
    environment's own .pth files, so the editable install of the checkout is not visible there."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(REPO),
                    "-w", str(tmp / "dist")], check=True, cwd=tmp, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("blip2_train-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True, timeout=300)
    py = tmp / "venv" / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "_blip2_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    return tmp / "venv"


def test_wheel_outside_the_repository_composes_every_experiment_and_trains_stage1(wheel_venv, synth, tmp_path):
    py = wheel_venv / "bin" / "python"
    experiments = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    script = (
        "import json, blip2_train\n"
        "from blip2_train.config.compose import compose, config_dir\n"
        "out = {'package': blip2_train.__file__, 'conf': str(config_dir()), 'composed': []}\n"
        f"for exp in {experiments!r}:\n"
        "    root = 'eval' if '# root: eval' in (config_dir() / 'experiment' / f'{exp}.yaml').read_text() else 'train'\n"
        "    cfg = compose(root, [f'experiment={exp}', 'preset=tiny'])\n"
        "    out['composed'].append((exp, cfg.task_name))\n"
        "print(json.dumps(out))\n")
    r = subprocess.run([str(py), "-c", script], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["package"].startswith(str(wheel_venv)) and out["conf"].startswith(str(wheel_venv))
    assert [e for e, _ in out["composed"]] == experiments
    # make demo's first stage, with the console script the wheel installed, from a directory outside the repo
    r = subprocess.run([str(wheel_venv / "bin" / "blip2-train"), *small_train(synth)], cwd=tmp_path,
                       env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    run = Path(summary_rows(r.stdout)["run"])
    assert run.is_relative_to(tmp_path) and json.loads((run / "metrics.json").read_text())["global_step"] == 2


def test_a_run_shows_steps_its_parts_and_no_library_noise(synth, tmp_path):
    """What a person watches: the progress bar counts steps of max_steps with the learning rate readable, one table
    of the model's parts (trainable / frozen), a line per checkpoint saved, each Lightning line once, and none of
    the warnings every run used to print."""
    args = small_train(synth, "trainer.max_steps=4", "callbacks.model_checkpoint.every_n_train_steps=2",
                       f"paths.output_dir={tmp_path / 'run'}")
    r = app(*[a for a in args if a != "callbacks.progress=null"])  # the shipped progress bar
    assert r.returncode == 0, r.stderr[-3000:]
    shown = r.stdout + r.stderr
    assert "step (4 in all)" in shown and "4/4" in shown and "Epoch 0/-2" not in shown
    lr = re.search(r"train/lr:\s+(\S+)", shown)
    assert lr and re.fullmatch(r"\d\.\d\de-\d\d", lr.group(1)), shown[-2000:]
    assert re.search(r"part\s+trainable\s+frozen\s+dtype", shown) and re.search(r"\nqformer\s+\S", shown)
    assert "Total FLOPs" not in shown and "LeafSpec" not in shown and "has `__len__` defined" not in shown
    assert shown.count("Seed set to") == 1
    saved = re.findall(r"checkpoint saved: (\S+) \(step (\d+)\)", shown)
    assert [Path(p).name for p, _ in saved][:2] == ["step0000002.ckpt", "last.ckpt"] and saved[-1][1] == "4"
