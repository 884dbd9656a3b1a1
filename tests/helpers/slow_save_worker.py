"""A real tiny stage-1 fit whose checkpoint at step 10 takes very long to write (an object whose pickling
sleeps), so the parent test can kill the process in the middle of that save."""

import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the helpers package
from helpers.tiny import tiny_stage1  # noqa: E402

from blip2_train.data.datamodule import Blip2DataModule  # noqa: E402
from blip2_train.lit.stage1 import Stage1Module  # noqa: E402
from blip2_train.lit.checkpoint_io import AtomicCheckpointIO  # noqa: E402


class SlowToPickle:
    def __reduce__(self):
        time.sleep(60)
        return (SlowToPickle, ())


class SlowSaveAtStep10(L.Callback):
    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step >= 10:
            checkpoint["slow"] = [b"x" * 1_000_000, SlowToPickle()]  # some bytes reach the file first


def main(tokenizer, shards, out):
    dm = Blip2DataModule(tokenizer, [{"name": "s", "urls": shards}], batch_size=8, num_workers=0, image_size=32,
                         hflip=False, samples_per_epoch=400)
    module = Stage1Module(tiny_stage1(tokenizer), lr=1e-3, warmup_steps=0, max_steps=100)
    ckpt = ModelCheckpoint(dirpath=out, filename="step{step:03d}", auto_insert_metric_name=False,
                           every_n_train_steps=5, save_last=True,
                           save_top_k=-1)
    trainer = L.Trainer(max_steps=100, accelerator="cpu", logger=False, callbacks=[ckpt, SlowSaveAtStep10()],
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)


if __name__ == "__main__":
    main(*sys.argv[1:])
