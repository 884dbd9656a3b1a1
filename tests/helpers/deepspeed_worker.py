"""DeepSpeed ZeRO-2 on CPU (one gloo process) through blip2-train's own strategy object and resume path: train a
tiny stage-1 model two steps, save with `Blip2DeepSpeedStrategy.save_checkpoint` (composed from
`strategy=deepspeed_zero2`: tag `checkpoint`, Lightning's client state), once as configured (frozen weights left
out) and once with `module.save_frozen_weights=true`; then resume the first into a fresh model through the
strategy's `load_checkpoint` (a real Trainer in the fitting state), and try a checkpoint with a trainable weight
removed. Then a tiny stage 2 whose frozen OPT ties its LM head to its input embedding: the tied alias must
not be saved either, and the checkpoint must resume. Lightning's DeepSpeed strategy refuses to set up without
CUDA, so the engine is made here as Lightning 2.6 makes it (deepspeed.initialize on the LightningModule).
Used by test_strategies.py; writes `report.json` and `trained_state.pt` into RUN_DIR."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers package


def main(tokenizer, run_dir, llm_dir):
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("DS_MASTER_PORT", "29561"))
    import deepspeed
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from blip2_train.config.compose import compose
    from blip2_train.lit.stage1 import Stage1Module
    from blip2_train.models.tokenizer import load_qformer_tokenizer
    from lightning.pytorch import Trainer
    from lightning.pytorch.trainer.states import TrainerFn

    from blip2_train.lit.stage2 import Stage2Module
    from blip2_train.distributed.deepspeed import frozen_names, load_deepspeed_checkpoint
    from blip2_train.utils.errors import CheckpointError
    from helpers.tiny import batch_of

    run = Path(run_dir)
    over = ["experiment=stage1_pretrain", "preset=tiny", f"paths.bert_dir={tokenizer}", f"paths.output_dir={run}",
            "arch.qformer.hidden_dropout_prob=0.0", "arch.qformer.attention_probs_dropout_prob=0.0",
            "strategy=deepspeed_zero2", "trainer.devices=1", "trainer.precision=32-true", "data.batch_size=3"]
    cfg = compose("train", over)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    deepspeed.init_distributed(dist_backend="gloo")
    tok = load_qformer_tokenizer(tokenizer)

    def engine_of(module, strategy):
        params = [p for p in module.parameters() if p.requires_grad]
        ds = {**strategy.config, "train_batch_size": 3, "gradient_accumulation_steps": 1}
        ds["zero_optimization"] = {**ds["zero_optimization"], "overlap_comm": False}  # no CUDA streams on CPU
        engine, *_ = deepspeed.initialize(model=module, optimizer=torch.optim.AdamW(params, lr=1e-2), config=ds)
        strategy.model = engine  # the strategy's `deepspeed_engine`
        return engine

    def fitting(module, strategy):  # what the strategy's load_checkpoint asks of its LightningModule
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
        trainer.state.fn = TrainerFn.FITTING
        module.trainer = trainer
        strategy._lightning_module = module

    strategy = instantiate(cfg.strategy)
    keeping = instantiate(compose("train", over + ["module.save_frozen_weights=true"]).strategy)
    torch.manual_seed(0)
    module = Stage1Module(instantiate(cfg.model), lr=1e-2, warmup_steps=0, max_steps=2)
    engine = engine_of(module, strategy)
    for step in range(2):
        img, ids, mask = batch_of(tok, ["a red circle", "a blue square", "two green triangles"], seed=step)
        engine.backward(module.model(img, ids, mask, torch.arange(3)).loss)
        engine.step()
    client = {"blip2_stage": 1, "global_step": 2, "epoch": 0, "pytorch-lightning_version": "2.6",
              "state_dict": {"dropped": torch.zeros(1)}, "optimizer_states": []}  # the two Lightning drops
    ckpt, full = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "with_frozen.ckpt"
    strategy.save_checkpoint(dict(client), ckpt)
    keeping.model = engine
    keeping.save_checkpoint(dict(client), full)
    trained = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save(trained, run / "trained_state.pt")
    moments = [s["exp_avg"].clone() for s in engine.optimizer.optimizer.state.values()]

    def states(p):
        return torch.load(p / "checkpoint" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)

    saved, saved_full = states(ckpt), states(full)
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    report = {
        "exclude_frozen_parameters": [strategy.exclude_frozen_parameters, keeping.exclude_frozen_parameters],
        "bytes": {k: (p / "checkpoint" / "mp_rank_00_model_states.pt").stat().st_size
                  for k, p in (("trainable_only", ckpt), ("with_frozen", full))},
        "frozen_bytes_bf16_or_fp32": sum(p.numel() * p.element_size() for n, p in module.model.named_parameters()
                                         if n in frozen),
        "frozen_in_module": sum(k.removeprefix("model.") in frozen for k in saved["module"]),
        "frozen_in_module_with_frozen": sum(k.removeprefix("model.") in frozen for k in saved_full["module"]),
        "frozen_fragments": len(saved.get("frozen_param_fragments") or {}),
        "frozen_fragments_with_frozen": len(saved_full.get("frozen_param_fragments") or {}),
        "client_state_dict_dropped": "state_dict" not in saved,
    }

    # resume into a fresh model (other random trainable weights, its own frozen ones) through the strategy's load
    torch.manual_seed(1)
    fresh = Stage1Module(instantiate(cfg.model), lr=1e-2, warmup_steps=0, max_steps=2)
    frozen_before = {n: p.detach().clone() for n, p in fresh.model.named_parameters() if n in frozen}
    engine2 = engine_of(fresh, strategy)
    fitting(fresh, strategy)
    client2 = strategy.load_checkpoint(ckpt)
    now = fresh.model.state_dict()
    report["resumed_trainable_max_diff"] = max((now[k] - trained[k]).abs().max().item() for k in trained
                                               if k not in frozen and k in now)
    report["resumed_frozen_unchanged"] = all(torch.equal(now[n], v) for n, v in frozen_before.items())
    moments2 = [s["exp_avg"] for s in engine2.optimizer.optimizer.state.values()]
    report["resumed_moments_max_diff"] = max((a - b).abs().max().item() for a, b in zip(moments, moments2))
    report["resumed_client_step"] = client2["global_step"]

    # a checkpoint that lost a trainable weight is refused, naming it
    import shutil

    broken = run / "broken.ckpt"
    shutil.copytree(ckpt, broken)
    saved["module"].pop("model.hf.query_tokens")
    torch.save(saved, broken / "checkpoint" / "mp_rank_00_model_states.pt")
    try:
        load_deepspeed_checkpoint(engine_of(fresh, strategy), broken, load_optimizer_states=True)
        report["missing_trainable_error"] = None
    except CheckpointError as e:
        report["missing_trainable_error"] = str(e)

    # stage 2 over a frozen OPT whose LM head is its input embedding (one tensor, two names)
    cfg2 = compose("train", ["experiment=stage2_pretrain", "preset=tiny", f"paths.llm_dir={llm_dir}",
                             "paths.stage1_checkpoint=null", f"paths.output_dir={run}/s2", "strategy=deepspeed_zero2",
                             "trainer.devices=1", "trainer.precision=32-true", "data.batch_size=3",
                             f"paths.bert_dir={tokenizer}"])
    strategy2 = instantiate(cfg2.strategy)
    s2 = Stage2Module(instantiate(cfg2.model), lr=1e-2, warmup_steps=0, max_steps=2)
    names_all, names_once = frozen_names(s2), {n for n, p in s2.named_parameters() if not p.requires_grad}
    engine_of(s2, strategy2)
    ck2, ck2_ds = run / "s2" / "last.ckpt", run / "s2" / "deepspeed_exclude.ckpt"
    strategy2.save_checkpoint(dict(client, blip2_stage=2), ck2)
    super(type(strategy2), strategy2).save_checkpoint(dict(client, blip2_stage=2), ck2_ds)  # DeepSpeed's own exclusion
    keys, keys_ds = set(states(ck2)["module"]), set(states(ck2_ds)["module"])
    report["stage2_tied_frozen_aliases"] = sorted(names_all - names_once)
    report["stage2_frozen_keys_saved"] = sorted(keys & names_all)
    report["stage2_frozen_keys_saved_by_deepspeed_exclude"] = sorted(keys_ds & names_all)
    s2b = Stage2Module(instantiate(cfg2.model), lr=1e-2, warmup_steps=0, max_steps=2)
    engine_of(s2b, strategy2)
    fitting(s2b, strategy2)
    report["stage2_resumed_step"] = strategy2.load_checkpoint(ck2)["global_step"]
    (run / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
