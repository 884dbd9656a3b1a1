"""Counting host syncs: the points of a training step where the host waits for the device.

A sync drains the device's queue: the host stops launching work until everything queued has run, so the device
then idles while the host does its Python work for the next kernels. One per step is the usual price of a
decision taken on the host (skip a non-finite step); each more is a gap worth removing.

`count_host_syncs(device)` counts them while a block runs:

- on CUDA, the truth: `torch.cuda.set_sync_debug_mode("warn")` makes torch warn at every synchronising call
  (`.item()`, `.cpu()`, `nonzero`, a boolean-mask index, a blocking copy ...); each warning is one sync;
- elsewhere (CPU, where nothing waits), the calls that WOULD force a device->host copy if the tensors lived on an
  accelerator, seen at the dispatcher: a tensor read as a Python number (`.item()`, `bool()`/`int()`/`float()` of
  a tensor, `if tensor:`; all reach `aten._local_scalar_dense`), an output whose size depends on the data
  (`nonzero` without a size, `masked_select`, a boolean-mask index or assignment, `unique`, `repeat_interleave`
  without `output_size`), `torch.equal`; and at the Python level `.tolist()`, `.numpy()` and `.cpu()`. Not
  `.to("cpu")`: on the CPU that is also how a batch moves to "the device", which is no copy back.
  Reads inside `torch/optim` are left out: torch keeps AdamW's step count on the host unless the optimizer is fused
  or capturable (which keep it on the device and never read it), so on an accelerator those reads are not syncs.
  The CPU count is therefore what the same step would sync on a GPU, as far as the calls show it; the CUDA count
  is the one to trust where a GPU is at hand.

Each sync records where it happened (the first caller outside torch), so a test can name every one it allows.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.abspath(__file__)
_OPTIM_DIR = os.path.join(_TORCH_DIR, "optim") + os.sep
_WARNINGS = os.path.abspath(warnings.__file__)

aten = torch.ops.aten
# ops whose result the host must read (a Python scalar) or whose output size depends on the data
_DATA_DEPENDENT = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.equal, aten._unique,
                   aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive}
# ops that sync only with a boolean index (it becomes `nonzero` inside the kernel)
_BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


@dataclass
class SyncCount:
    """The syncs seen: `events` is a list of (what, where); `where` is `path:line function` of the first caller
    outside torch (path shortened to the package it is in)."""

    mode: str  # "cuda sync debug mode" or "cpu: calls that would sync on an accelerator"
    events: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.events)

    def by_site(self) -> Counter:
        return Counter(where for _, where in self.events)

    def summary(self) -> str:
        sites = ", ".join(f"{w} x{n}" if n > 1 else w for w, n in self.by_site().most_common())
        return f"{self.total} host sync(s) ({self.mode})" + (f": {sites}" if sites else "")


def _short(path: str) -> str:
    for marker in ("site-packages" + os.sep, "blip2_train" + os.sep):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail if marker.startswith("site") else "blip2_train/" + tail
    return os.path.basename(path)


def _caller() -> tuple[str, bool]:
    """(`path:line function` of the first frame outside torch and this file, whether torch.optim asked)."""
    f = sys._getframe(1)
    from_optim = False
    while f is not None:
        path = f.f_code.co_filename
        if path.startswith(_OPTIM_DIR):
            from_optim = True
        if not path.startswith(_TORCH_DIR) and os.path.abspath(path) not in (_HERE, _WARNINGS):
            return f"{_short(path)}:{f.f_lineno} {f.f_code.co_name}", from_optim
        f = f.f_back
    return "?", from_optim


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, count: SyncCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        name = None
        if packet in _DATA_DEPENDENT:
            name = packet.__name__
        elif packet in _BOOL_INDEXED and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
                if i is not None):
            name = f"{packet.__name__} with a boolean mask"
        elif packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor and \
                kwargs.get("output_size") is None:
            name = "repeat_interleave without output_size"
        if name is not None:
            where, from_optim = _caller()
            if not from_optim:
                self.count.events.append((name, where))
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    """The host copies that do not reach the dispatcher when the tensor already lives on the CPU."""

    COPIES = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy", torch.Tensor.cpu: "cpu"}

    def __init__(self, count: SyncCount):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = self.COPIES.get(func)
        if name is not None:
            where, from_optim = _caller()
            if not from_optim:
                self.count.events.append((name, where))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs(device: torch.device | str | None = None) -> Iterator[SyncCount]:
    """Count the host syncs of the block (see the module's docstring for what counts on each device).

    On CUDA the sync debug mode is process-wide: torch's own warnings of other threads in that time count too.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        count = SyncCount("cuda sync debug mode")
        before = torch.cuda.get_sync_debug_mode()

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                where, from_optim = _caller()
                if not from_optim:
                    count.events.append((str(message).split("\n", 1)[0][:80], where))

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # restored by catch_warnings
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield count
            finally:
                torch.cuda.set_sync_debug_mode(before)
        return
    count = SyncCount("cpu: calls that would sync on an accelerator")
    with _FunctionCounter(count), _DispatchCounter(count):
        yield count
