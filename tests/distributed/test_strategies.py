"""Strategies on CPU: every strategy config composes with every stage, the generated DeepSpeed config passes
DeepSpeed's validator (and bad combinations fail before any GPU work), DeepSpeed and FSDP-style sharded checkpoints
resume and export, evaluation under sharded parameters is refused, W&B run ids survive a resume."""

from __future__ import annotations

import pytest

from blip2_train.config.compose import compose, config_dir

STRATEGIES = sorted(p.stem for p in (config_dir() / "strategy").glob("*.yaml"))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_composes_with_every_stage(strategy):
    for exp in ("stage1_pretrain", "stage2_pretrain", "caption_coco_ft"):
        cfg = compose("train", [f"experiment={exp}", f"strategy={strategy}", "trainer.devices=8", "trainer.num_nodes=2"])
        assert cfg.strategy is not None


@pytest.mark.parametrize("stage", [2, 3])
def test_generated_deepspeed_config_passes_deepspeeds_validator(stage):
    from hydra.utils import instantiate

    from blip2_train.distributed.deepspeed import build_deepspeed_config, validate_deepspeed_config

    cfg = compose("train", ["experiment=stage2_pretrain", f"strategy=deepspeed_zero{stage}", "trainer.devices=8",
                            "trainer.num_nodes=2", "trainer.accumulate_grad_batches=4", "trainer.gradient_clip_val=1.0"])
    strategy = instantiate(cfg.strategy)  # builds, validates, hands to Lightning
    assert strategy.config["zero_optimization"]["stage"] == stage
    assert strategy.config["train_micro_batch_size_per_gpu"] == 64 and strategy.config["gradient_clipping"] == 1.0
    assert "gradient_accumulation_steps" not in strategy.config  # Lightning sets it from the Trainer
    full = build_deepspeed_config(stage, 64, 4, 16, "bf16-mixed", 1.0)
    assert full["train_batch_size"] == 64 * 4 * 16 and full["bf16"] == {"enabled": True, "check_grad_overflow": True}
    validate_deepspeed_config(full, 16)


def test_bad_deepspeed_combinations_fail_early():
    from blip2_train.distributed.deepspeed import build_deepspeed_config, validate_deepspeed_config
    from blip2_train.utils.errors import ConfigError

    with pytest.raises(ConfigError, match="offload_parameters needs ZeRO stage 3"):
        build_deepspeed_config(2, 8, offload_parameters=True)
    with pytest.raises(ConfigError, match="precision"):
        build_deepspeed_config(2, 8, precision="64-true")
    with pytest.raises(ConfigError, match="data.batch_size must be a positive integer"):
        build_deepspeed_config(2, 0)
    bad = build_deepspeed_config(2, 8, 2, 4)
    bad["train_batch_size"] = 100
    with pytest.raises(ConfigError, match="batch sizes disagree"):
        validate_deepspeed_config(bad, 4)
    bad = build_deepspeed_config(2, 8)
    bad["zero_optimization"]["stage"] = 7
    with pytest.raises(ConfigError, match="invalid DeepSpeed config"):
        validate_deepspeed_config(bad, 1)


def test_fsdp_wraps_vit_qformer_and_llm_layers():
    from hydra.utils import instantiate

    cfg = compose("train", ["experiment=stage2_pretrain", "strategy=fsdp"])
    names = {c.__name__ for c in instantiate(cfg.strategy).block_classes}
    assert {"Blip2EncoderLayer", "Blip2QFormerLayer", "OPTDecoderLayer", "LlamaDecoderLayer", "T5Block"} <= names


def test_wandb_run_id_is_kept_on_resume(tmp_path):
    from blip2_train.cli.train import build_loggers

    cfg = compose("train", ["logger=wandb", f"paths.output_dir={tmp_path}"])
    (a,) = build_loggers(cfg, run_id="blip2-abc")
    assert a._wandb_init["id"] == "blip2-abc" and a._wandb_init["resume"] == "allow"


def test_deepspeed_checkpoint_leaves_frozen_weights_out_resumes_and_exports(synth, tiny_llms, tmp_path):
    """ZeRO-2 on CPU (deepspeed.initialize, gloo) through `strategy=deepspeed_zero2`'s own strategy object: its
    checkpoint holds no frozen weight, not even a tied alias of one (DeepSpeed's default writes them all;
    its own exclusion keeps a frozen LM head tied to the embedding), resumes through the strategy's
    load_checkpoint into a fresh model (trainable weights and Adam moments restored, frozen ones left as
    configured), refuses a checkpoint that lost a trainable weight by name, and blip2-export turns it into a
    transformers directory."""
    import json
    import subprocess
    import sys

    import torch

    from helpers.procs import REPO, clean_env

    import socket

    with socket.socket() as s:  # a free port: another test session on this machine may hold a fixed one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "ds_run"
    r = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "deepspeed_worker.py"), str(synth["tokenizer"]), str(run),
                        str(tiny_llms["opt"])],
                       cwd=REPO, env=clean_env(DS_ACCELERATOR="cpu", DS_MASTER_PORT=str(port)),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((run / "report.json").read_text())
    assert rep["exclude_frozen_parameters"] == [True, False]  # module.save_frozen_weights owns it
    assert rep["frozen_in_module"] == 0 and rep["frozen_fragments"] == 0 and rep["client_state_dict_dropped"]
    assert rep["frozen_in_module_with_frozen"] > 0 and rep["frozen_fragments_with_frozen"] > 0
    # DeepSpeed's default lists the frozen weights twice (module + frozen_param_fragments, one shared storage)
    saved = rep["bytes"]["with_frozen"] - rep["bytes"]["trainable_only"]
    assert saved > 0.95 * rep["frozen_bytes_bf16_or_fp32"], rep
    assert rep["resumed_trainable_max_diff"] < 1e-6 and rep["resumed_moments_max_diff"] < 1e-7
    assert rep["resumed_frozen_unchanged"] and rep["resumed_client_step"] == 2
    assert rep["missing_trainable_error"] and "hf.query_tokens" in rep["missing_trainable_error"]
    # the frozen OPT's LM head is its input embedding: DeepSpeed's own exclusion keeps that second name
    assert rep["stage2_tied_frozen_aliases"], rep
    assert set(rep["stage2_tied_frozen_aliases"]) <= set(rep["stage2_frozen_keys_saved_by_deepspeed_exclude"])
    assert rep["stage2_frozen_keys_saved"] == [] and rep["stage2_resumed_step"] == 2

    ckpt = run / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / "checkpoint").is_dir()
    r = subprocess.run([sys.executable, "-m", "blip2_train.cli.export", str(ckpt), "--out", str(tmp_path / "export")],
                       cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    from blip2_train.models.export import read_stage1_export_weights

    exported = read_stage1_export_weights(tmp_path / "export")
    trained = torch.load(run / "trained_state.pt")
    for k in ("hf.query_tokens", "hf.qformer.encoder.layer.0.crossattention.attention.query.weight", "temp"):
        torch.testing.assert_close(exported[k].float(), trained[k].float().reshape(exported[k].shape), msg=k)


def test_fsdp_style_sharded_checkpoint_exports_consolidated(synth, tmp_path):
    """A torch.distributed.checkpoint directory as Lightning's FSDP strategy writes it (tensor shards +
    `meta.pt` with the rest) -> blip2-export -> the trained weights in a transformers directory."""
    import torch
    import torch.distributed.checkpoint as dcp
    from omegaconf import OmegaConf

    from blip2_train.cli.export import main as export_main
    from blip2_train.lit.stage1 import Stage1Module
    from blip2_train.models.export import read_stage1_export_weights

    cfg = compose("train", ["experiment=stage1_pretrain", "preset=tiny", f"paths.data_dir={synth['dir']}",
                            f"paths.output_dir={tmp_path / 'run'}"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    from hydra.utils import instantiate

    module = Stage1Module(instantiate(cfg.model))
    with torch.no_grad():
        module.model.hf.query_tokens.add_(1.0)  # "trained"
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    dcp.save({"model": module.state_dict()}, checkpoint_id=str(ckpt), no_dist=True)
    torch.save({"blip2_stage": 1, "global_step": 3}, ckpt / "meta.pt")
    assert export_main([str(ckpt), "--out", str(tmp_path / "export")]) == 0
    exported = read_stage1_export_weights(tmp_path / "export")
    torch.testing.assert_close(exported["hf.query_tokens"], module.model.hf.query_tokens.detach())


@pytest.mark.parametrize("strategy", ["deepspeed_zero3", "fsdp"])
def test_evaluation_under_sharded_parameters_is_refused_before_any_work(strategy, synth, tmp_path):
    """Periodic / final evaluation call the model outside the engine; under ZeRO-3 or FSDP its parameters are
    sharded there. blip2-train refuses in one line, before creating anything, and says what to do instead."""
    from helpers.tiny import tiny_cli
    from helpers.procs import cli, one_line

    line = one_line(cli("experiment=stage1_pretrain", *tiny_cli(synth, f"strategy={strategy}",
                                                                f"paths.output_dir={tmp_path / 'run'}")))
    assert "ZeRO-3 / FSDP" in line and "eval.enabled=false" in line and "blip2-eval" in line
    assert not (tmp_path / "run").exists()
    from blip2_train.cli.train import check_evaluation_fits_strategy

    ok = compose("train", ["experiment=stage1_pretrain", f"strategy={strategy}", "eval.enabled=false",
                           "callbacks.periodic_eval.every_n_steps=0"])
    check_evaluation_fits_strategy(ok)  # without evaluation the run goes ahead
