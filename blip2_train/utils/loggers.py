"""A CSV logger that keeps a run's history across resumes.

Lightning's CSVLogger deletes `metrics.csv` when it opens a directory that already holds one, so a resumed
(or merely restarted) run kept only the steps after its checkpoint. This one appends, under the header the
file already has, and flushes every logged step by default so that a killed run loses no logged rows.
A resumed run logs again the steps between its checkpoint and the kill: they appear twice, with the same
values (the resume is exact).
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # the parent warns and deletes metrics.csv here; keep it and continue its header
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    def __init__(self, *args, flush_logs_every_n_steps: int = 1, **kwargs):
        super().__init__(*args, flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
