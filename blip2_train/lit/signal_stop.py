"""Stop on SIGTERM / SIGINT without losing work: every rank stops after the same optimizer step, a checkpoint of
that step is written, and `blip2-train` exits non-zero (128 + the signal, as a shell reports a killed job).

SIGTERM is what `scancel`, preemption without SLURM's `--signal` lead time, Kubernetes and torchrun's elastic agent
send (torchrun forwards it to its workers and kills them 30 s later). Lightning's own handler only acts at the end
of an epoch on one process, runs a collective inside the signal handler under DDP, and ends the run with exit
status 0 and nothing saved. Here the handlers only set a flag; the flag is reduced over ranks at each optimizer-step
boundary (one tiny all-reduce per step), so every rank saves and stops after the same step whichever ranks the
signal reached (a terminal's Ctrl-C reaches them all; `kill` only one). A second Ctrl-C on a rank aborts it at once.
Under SLURM with auto-requeue, Lightning's SIGUSR1 path (hpc_ckpt_N.ckpt, then `scontrol requeue`) is kept; the
SIGTERM that ends the job afterwards saves and stops here, and the requeued job resumes from the newest checkpoint
with `ckpt_path=auto`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalStop(L.Callback):
    def __init__(self) -> None:
        self.received: int | None = None  # the first signal this rank received
        self.stopped: dict | None = None  # {"signal", "exit_code", "step", "checkpoint"} once a signal stopped the run
        self._previous: dict = {}
        self._checked_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self.received, self.stopped, self._checked_step = None, None, trainer.global_step
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return
        # after Lightning registered its own handlers (Trainer._run): these replace its SIGTERM one during fit
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received is not None:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # a second Ctrl-C: abort now, without a checkpoint
        if self.received is None:
            self.received = signum
            log.warning("received %s: stopping after the current optimizer step, with a checkpoint%s",
                        signal.Signals(signum).name,
                        " (Ctrl-C again aborts at once)" if signum == signal.SIGINT else "")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._checked_step:  # inside a gradient-accumulation window
            return
        self._checked_step = trainer.global_step
        self._stop_if_signalled(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # a signal during the last step: training is done, but the run still stops here (no final evaluation)
        if self.stopped is None:
            self._stop_if_signalled(trainer)
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _stop_if_signalled(self, trainer) -> None:
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        # the signal that reached this rank; a rank it has not reached (yet) stops all the same
        signum = self.received or signal.SIGTERM
        path = self._save(trainer)
        trainer.should_stop = True
        self.stopped = {"signal": signal.Signals(signum).name, "exit_code": 128 + int(signum),
                        "step": trainer.global_step, "checkpoint": str(path) if path else None}

    def _save(self, trainer) -> Path | None:
        mc = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        if mc is None:  # checkpointing is off: nothing to write
            return None
        path = Path(mc.dirpath) / mc.format_checkpoint_name({"step": trainer.global_step})
        trainer.save_checkpoint(path)  # every rank takes part; written atomically (AtomicCheckpointIO)
        # last.ckpt names the same step: a hard link, not a second write (sharded saves are directories: left as is)
        if mc.save_last and trainer.is_global_zero and path.is_file():
            last = Path(mc.dirpath) / f"{mc.CHECKPOINT_NAME_LAST}{mc.FILE_EXTENSION}"
            tmp = last.with_name(f".{last.name}.tmp-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            os.link(path, tmp)
            os.replace(tmp, last)
        trainer.strategy.barrier("signal_stop_saved")
        return path

    def _restore(self) -> None:
        """Give the handlers back before Lightning's teardown puts back the ones it found: a signal during the
        final evaluation or an export then does what it did before training."""
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
        self._previous = {}
