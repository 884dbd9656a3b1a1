"""Train a tiny stage-1 model two steps with DeepSpeed ZeRO-2 on CPU (one gloo process) and save the
checkpoint directory the way Lightning's DeepSpeedStrategy lays it out (module wrapped as `_forward_module`,
tag `checkpoint`, Lightning's client state). Then blip2-export must read it. Used by test_scale.py."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def main(tokenizer, run_dir):
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=os.environ.get("MASTER_PORT", "29561"))
    import deepspeed
    from omegaconf import OmegaConf

    from blip2_train.cli.common import compose
    from blip2_train.lit.stage1 import Stage1Module
    from conftest import batch_of

    cfg = compose("train", ["experiment=stage1_pretrain", "preset=tiny", f"paths.bert_dir={tokenizer}",
                            f"paths.output_dir={run_dir}", "arch.qformer.hidden_dropout_prob=0.0",
                            "arch.qformer.attention_probs_dropout_prob=0.0"])
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    from hydra.utils import instantiate

    module = Stage1Module(instantiate(cfg.model), lr=1e-2, warmup_steps=0, max_steps=2)

    class Wrapper(torch.nn.Module):  # what Lightning hands to deepspeed.initialize
        def __init__(self, m):
            super().__init__()
            self._forward_module = m

    deepspeed.init_distributed(dist_backend="gloo")
    wrapper = Wrapper(module)
    params = [p for p in wrapper.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=wrapper, optimizer=torch.optim.AdamW(params, lr=1e-2),
        config={"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1,
                "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
                "steps_per_print": 10 ** 9})
    from blip2_train.models.tokenizer import load_qformer_tokenizer

    tok = load_qformer_tokenizer(tokenizer)
    for step in range(2):
        img, ids, mask = batch_of(tok, ["a red circle", "a blue square", "two green triangles"], seed=step)
        loss = module.model(img, ids, mask, torch.arange(3)).loss
        engine.backward(loss)
        engine.step()
    ckpt = Path(run_dir) / "checkpoints" / "last.ckpt"
    client = {"blip2_stage": 1, "global_step": 2, "epoch": 0, "pytorch-lightning_version": "2.6"}
    engine.save_checkpoint(str(ckpt), tag="checkpoint", client_state=client)
    trained = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save(trained, Path(run_dir) / "trained_state.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
