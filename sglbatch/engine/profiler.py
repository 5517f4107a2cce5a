"""torch.profiler sessions written as Chrome/Perfetto trace JSON: `sglbatch profile -- ...`
and the server's /start_profile + /stop_profile (see `Engine.start_profile`).

While a session runs, the `sglbatch.*` ranges of `sglbatch.engine.trace` are recorded, so the
trace shows the scheduler's phases and each decoder layer around the aten ops.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sglbatch.engine import trace

logger = logging.getLogger(__name__)

ACTIVITIES = ("CPU", "GPU")
_sequence = itertools.count()


def default_output_dir() -> Path:
    """As SGLang: $SGLANG_TORCH_PROFILER_DIR (or $SGLBATCH_TORCH_PROFILER_DIR), else the
    system's temp dir."""
    for var in ("SGLBATCH_TORCH_PROFILER_DIR", "SGLANG_TORCH_PROFILER_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir())


class ProfileSession:
    """One torch profiler run, from `start` to `stop`, which writes
    `<output_dir>/<name>-<time>-<pid>-<n>.trace.json` and returns its path.

    `all_threads`: record every thread (the command line: the engine has its own thread);
    otherwise only the thread that calls `start` (the engine thread, for /start_profile).
    `stop` must run on the thread that ran `start`. `num_steps`: the caller counts steps with
    `step()`, which says when the session should stop.
    """

    def __init__(self, output_dir: str | Path | None = None, *, name: str = "sglbatch",
                 record_shapes: bool = False, with_stack: bool = False,
                 activities: list[str] | tuple[str, ...] | None = None,
                 num_steps: int | None = None, all_threads: bool = False):
        if num_steps is not None and (isinstance(num_steps, bool) or
                                      not isinstance(num_steps, int) or num_steps <= 0):
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        activities = list(activities) if activities is not None else list(ACTIVITIES)
        unknown = [a for a in activities if a not in ACTIVITIES]
        if unknown or not activities:
            raise ValueError(f"activities: {unknown or activities} not supported; choose from "
                             f"{list(ACTIVITIES)}")
        self.output_dir = Path(output_dir) if output_dir else default_output_dir()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.trace_path = self.output_dir / (
            f"{name}-{stamp}-{os.getpid()}-{next(_sequence)}.trace.json")
        self.num_steps = num_steps
        self.steps = 0
        kinds = [torch.profiler.ProfilerActivity.CPU] if "CPU" in activities else []
        if "GPU" in activities and torch.cuda.is_available():
            kinds.append(torch.profiler.ProfilerActivity.CUDA)
        if not kinds:
            raise ValueError("activities: GPU alone was asked for, but CUDA is not available")
        kwargs: dict[str, Any] = {}
        if all_threads:
            from torch._C._profiler import _ExperimentalConfig

            kwargs["experimental_config"] = _ExperimentalConfig(profile_all_threads=True)
        self._profiler = torch.profiler.profile(activities=kinds, record_shapes=record_shapes,
                                                with_stack=with_stack, **kwargs)
        self._running = False

    def start(self) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"output_dir {str(self.output_dir)!r}: {e}") from None
        if not os.access(self.output_dir, os.W_OK):
            raise ValueError(f"output_dir {str(self.output_dir)!r} is not writable")
        trace.enable()
        try:
            self._profiler.start()
        except RuntimeError as e:  # e.g. another profiler is already running
            trace.disable()
            raise ValueError(f"cannot start the torch profiler: {e}") from None
        self._running = True
        logger.info("torch profiler started; the trace will be written to %s", self.trace_path)

    def step(self) -> bool:
        """Count one engine step; True once `num_steps` have run."""
        self.steps += 1
        return self.num_steps is not None and self.steps >= self.num_steps

    def stop(self) -> Path:
        if not self._running:
            raise RuntimeError("the profiler is not running")
        self._running = False
        try:
            self._profiler.stop()
        finally:
            trace.disable()
        self._profiler.export_chrome_trace(str(self.trace_path))
        logger.info("torch profiler trace written to %s", self.trace_path)
        return self.trace_path

    def top_ops(self, limit: int = 20) -> list[dict[str, Any]]:
        """The ops (and ranges) with the most self CPU time, after `stop`."""
        averages = sorted(self._profiler.key_averages(), key=lambda e: e.self_cpu_time_total,
                          reverse=True)
        total = sum(e.self_cpu_time_total for e in averages) or 1.0
        return [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                 "cpu_total_ms": e.cpu_time_total / 1e3,
                 "self_cpu_percent": 100.0 * e.self_cpu_time_total / total}
                for e in averages[:limit]]


def print_top_ops(console: Any, rows: list[dict[str, Any]], title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    for column in ("op", "calls", "self CPU (ms)", "self CPU %", "CPU total (ms)"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for row in rows:
        table.add_row(row["name"], str(row["calls"]), f"{row['self_cpu_ms']:.2f}",
                      f"{row['self_cpu_percent']:.1f}", f"{row['cpu_total_ms']:.2f}")
    console.print(table)
