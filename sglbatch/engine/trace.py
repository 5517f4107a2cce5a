"""Named ranges for profiles: `torch.profiler` events (Chrome/Perfetto traces) and NVTX ranges
(Nsight Systems), costing ~nothing when nobody is profiling.

    with trace_range("sglbatch.forward_decode"):
        ...

A range is recorded while a torch profiler runs (ours: `sglbatch profile`, /start_profile;
or anyone's, detected per call), or always with `SGLBATCH_TRACE=1` (for `nsys profile`, which
torch cannot see). Otherwise `trace_range` returns a shared no-op context: ~0.2 us per range
against ~6 us for an unconditional `record_function`, which at ~95 ranges per forward pass
would cost about half a millisecond per decode step.

NVTX ranges are pushed only where CUDA is available: through the `nvtx` package when it is
installed, else `torch.cuda.nvtx`.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

PREFIX = "sglbatch."

_NULL = contextlib.nullcontext()
_lock = threading.Lock()
_sessions = 0  # our profilers running now (see `enable`)
_forced = os.environ.get("SGLBATCH_TRACE", "") not in ("", "0")
_active = _forced
_profiler_enabled: Callable[[], bool] = torch._C._autograd._profiler_enabled
_nvtx: tuple[Callable[[str], Any], Callable[[], Any]] | None | bool = False  # False: not probed


def _nvtx_functions() -> tuple[Callable[[str], Any], Callable[[], Any]] | None:
    global _nvtx
    if _nvtx is False:
        _nvtx = None
        if torch.cuda.is_available():
            try:
                import nvtx  # the PyPI package: cheaper than torch's binding

                _nvtx = (nvtx.push_range, nvtx.pop_range)
            except ImportError:
                _nvtx = (torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop)
    return _nvtx


class _Range:
    __slots__ = ("_nvtx", "_record", "name")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> _Range:
        self._record = torch.autograd.profiler.record_function(self.name)
        self._record.__enter__()
        self._nvtx = _nvtx_functions()
        if self._nvtx is not None:
            self._nvtx[0](self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._nvtx is not None:
            self._nvtx[1]()
        self._record.__exit__(*exc)


def trace_range(name: str) -> contextlib.AbstractContextManager:
    """A context manager that records `name` (give the full name, `sglbatch.` prefix
    included, as a constant: nothing is formatted on the hot path) while profiling."""
    if _active or _profiler_enabled():
        return _Range(name)
    return _NULL


def enable() -> None:
    """A profiler of ours starts: record ranges until the matching `disable`."""
    global _sessions, _active
    with _lock:
        _sessions += 1
        _active = True


def disable() -> None:
    global _sessions, _active
    with _lock:
        _sessions = max(0, _sessions - 1)
        _active = _forced or _sessions > 0


def is_active() -> bool:
    return _active
