"""Stop on SIGTERM / SIGINT without losing work: every rank stops after the same optimizer step, a checkpoint of
that step is written, and `blip2-train` exits non-zero (128 + the signal, as a shell reports a killed job).

SIGTERM is what `scancel`, preemption without SLURM's `--signal` lead time, Kubernetes and torchrun's elastic agent
send (torchrun forwards it to its workers and kills them 30 s later). Lightning's own handler only acts at the end
of an epoch on one process, runs a collective inside the signal handler under DDP, and ends the run with exit
status 0 and nothing saved. Here the handlers only set a flag; the flag is reduced over ranks at each optimizer-step
boundary (one tiny all-reduce per step), so every rank saves and stops after the same step whichever rank the
signal reached first. A second Ctrl-C aborts at once. Under SLURM with auto-requeue, Lightning's SIGUSR1 path
(hpc_ckpt_N.ckpt, then `scontrol requeue`) is kept; the SIGTERM that ends the job afterwards saves and stops here,
and the requeued job resumes from the newest checkpoint with `ckpt_path=auto`.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class SignalStop(L.Callback):
    def __init__(self) -> None:
        self.received: int | None = None  # the first signal this rank received
        self.stopped: dict | None = None  # {"signal", "step", "checkpoint"} once the run stopped on a signal
        self._previous: dict = {}
        self._checked_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        # after Lightning registered its own handlers (Trainer._run), so these replace its SIGTERM one
        self.received, self.stopped, self._checked_step = None, None, trainer.global_step
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._make_handler(trainer))

    def _make_handler(self, trainer):
        def handler(signum, frame):
            if signum == signal.SIGINT and self.received is not None:
                signal.signal(signal.SIGINT, signal.default_int_handler)
                raise KeyboardInterrupt  # a second Ctrl-C: abort now, without a checkpoint
            first = self.received is None
            self.received = self.received or signum
            if first:
                launcher = trainer.strategy.launcher
                if launcher is not None and hasattr(launcher, "kill"):
                    launcher.kill(signum)  # ranks that Lightning started itself get the signal too
                log.warning("received %s: stopping after the current optimizer step, with a checkpoint%s",
                            signal.Signals(signum).name, " (Ctrl-C again aborts at once)" if signum == signal.SIGINT
                            else "")
        return handler

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._checked_step:  # inside a gradient-accumulation window
            return
        self._checked_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        # the signal that reached a rank first; a rank the signal has not reached yet stops all the same
        signum = self.received or signal.SIGTERM
        path = self._save(trainer)
        trainer.should_stop = True
        self.stopped = {"signal": signal.Signals(signum).name, "exit_code": 128 + int(signum),
                        "step": trainer.global_step, "checkpoint": str(path) if path else None}

    def _save(self, trainer) -> Path | None:
        mc = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.dirpath), None)
        if mc is None:  # checkpointing is off: nothing to write
            return None
        path = Path(mc.dirpath) / (mc.format_checkpoint_name({"step": trainer.global_step}))
        trainer.save_checkpoint(path)  # every rank takes part; written atomically (AtomicCheckpointIO)
        trainer.strategy.barrier("signal_stop_saved")
        return path

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for sig, previous in self._previous.items():
            if previous is not None:
                signal.signal(sig, previous)
        self._previous = {}
