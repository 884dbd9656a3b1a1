"""Real Hydra composition of the shipped configs, and the CLI's one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from blip2_train.config.compose import compose, config_dir
from helpers.tiny import REPO

EXPERIMENTS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


def root_of(experiment: str) -> str:
    text = (config_dir() / "experiment" / f"{experiment}.yaml").read_text()
    return "eval" if "# root: eval" in text else "train"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_data_module(experiment, synth, tiny_llms):
    cfg = compose(root_of(experiment), [f"experiment={experiment}", f"paths.bert_dir={synth['tokenizer']}",
                                        "paths.vision_checkpoint=null", f"paths.llm_dir={tiny_llms['opt']}",
                                        "paths.stage1_checkpoint=null", f"paths.stage2_checkpoint={tiny_llms['opt']}"])
    with open_dict(cfg):
        cfg.paths.output_dir = "/tmp/unused"
    dm = instantiate(cfg.data)
    assert dm.batch_size > 0 and dm.image_size == cfg.data.image_size
    if dm.text.get("kind") == "llm":  # stage 2: the LLM's tokenizer with <image>, and a collator that agrees
        assert "<image>" in dm.tokenizer.get_vocab()
        col = dm.make_collator()
        assert col.nq == cfg.model.num_query_tokens and col.prompt == (cfg.model.text.prompt or "")
    elif dm.text.get("kind") == "instruct":  # both tokenizers: the LLM's (reference specials) and the Q-Former's
        assert "<image>" in dm.tokenizer.get_vocab() and dm.tokenizer.pad_token == "[PAD]"
        assert dm.qformer_tokenizer.bos_token == "[DEC]"
        col = dm.make_collator()
        assert col.nq == cfg.model.num_query_tokens and col.max_txt_len == cfg.data.max_txt_len == 128
    else:
        assert dm.tokenizer.bos_token == "[DEC]"


@pytest.mark.parametrize("group", ["strategy", "logger", "trainer", "model", "arch", "preset"])
def test_every_group_option_composes(group):
    for opt in sorted(p.stem for p in (config_dir() / group).glob("*.yaml")):
        cfg = compose("train", [f"{group}={opt}"])
        # a preset is a global overlay (no node of its own): it resizes the towers
        assert group in cfg if group != "preset" else cfg.arch.vision.hidden_size < 1408


def run_cli(args, **env):
    e = {**os.environ, "WANDB_MODE": "offline", **env}
    return subprocess.run([sys.executable, "-m", "blip2_train.cli.train", *args], capture_output=True, text=True,
                          cwd=REPO, env=e, timeout=120)


def test_unknown_key_gives_one_line_error():
    r = run_cli(["experiment=stage1_pretrain", "preset=tiny", "data.batch_sze=8"])
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "data.batch_sze" in lines[0] and "unknown config key" in lines[0]


def test_missing_required_path_names_the_key():
    r = run_cli(["arch=tiny", "trainer=cpu", "strategy=auto", "logger=none"])
    assert r.returncode == 2
    assert "paths.bert_dir" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_instruct_model_configs_give_each_llm_its_own_special_tokens():
    """instruct_vicuna carries the reference's Vicuna tokens; instruct_flant5 and instruct_opt replace them with none
    (each LLM's own), and paths.stage1_checkpoint reaches the model (its trained text parts)."""
    want = {"instruct_vicuna": {"pad_token": "[PAD]", "bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"},
            "instruct_flant5": None, "instruct_opt": None}
    for model, tokens in want.items():
        cfg = compose("train", ["experiment=instruct_tune", f"model={model}", "paths.stage1_checkpoint=/ckpt/s1"])
        got = cfg.model.text.special_tokens
        assert (None if got is None else dict(got)) == tokens, model
        assert cfg.model.stage1_checkpoint == "/ckpt/s1" and cfg.data.text.special_tokens == cfg.model.text.special_tokens
    assert compose("train", ["experiment=instruct_tune"]).model.stage1_checkpoint is None  # paths.stage1_checkpoint ???
