"""Run retrieval and captioning evaluation under torch.distributed.run (1 or N gloo processes); rank 0 writes
the metrics and predictions as JSON. Used by test_eval_distributed.py."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_stage1, tiny_stage2  # noqa: E402


def main(out, tokenizer, ann, image_root, llm, stage1):
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    from blip2_train.data.datamodule import Blip2DataModule
    from blip2_train.eval.runner import run_evaluation

    eval_set = {"annotation": ann, "image_root": image_root}
    s1 = tiny_stage1(tokenizer, seed=4)
    dm = Blip2DataModule(tokenizer, eval_set=eval_set, eval_batch_size=5, num_workers=0, image_size=32)
    retrieval = run_evaluation(s1, dm, {"kind": "retrieval", "k_test": 6, "pair_batch_size": 7})
    s2 = tiny_stage2(llm, stage1)
    dm2 = Blip2DataModule(llm, eval_set=eval_set, eval_batch_size=5, num_workers=0, image_size=32,
                          text={"kind": "llm", "num_query_tokens": 4, "prompt": "a photo of"})
    pred_dir = Path(out).parent / f"preds_{os.environ.get('WORLD_SIZE', '1')}"
    caption = run_evaluation(s2, dm2, {"kind": "caption", "spice": False,
                                       "generate": {"num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 2}},
                             out_dir=pred_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        preds = json.loads((pred_dir / "captions_predictions.json").read_text())
        drop = ("eval_seconds", "eval_itc_seconds")
        Path(out).write_text(json.dumps({"retrieval": {k: v for k, v in retrieval.items() if k not in drop},
                                         "caption": {k: v for k, v in caption.items() if k not in drop},
                                         "predictions": preds}))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
