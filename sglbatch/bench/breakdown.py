"""Where engine step time goes, read from a torch profiler trace of the engine thread.

Every `sglbatch.step` range is one engine step. Each event inside it (a `sglbatch.*` range
or an op) contributes its self time (its duration less its children's) to one category:

- a phase range decides it: `sglbatch.schedule`, `sglbatch.prepare` (step inputs, forward
  batch, attention metadata), `sglbatch.sample` (and `sglbatch.input_logprobs`),
  `sglbatch.process_output`, `sglbatch.wait_device` (reading a launched step's tokens: on
  a GPU, the forward time the host did not overlap);
- inside `sglbatch.attention_backend`: gather/copy/scatter ops are "gathers and KV writes",
  everything else (ops, kernel calls made outside torch) is attention;
- elsewhere in the forward, the outermost op decides: matmuls are linear, gather/copy/scatter
  ops are "gathers and KV writes", other ops (norms, rotary, activations) are "other model
  ops", and time between ops is Python;
- the step's own self time (outside every phase) is Python too.

So the shares add up to the step time exactly. The profiler adds a few microseconds per op
and range, which falls mostly on Python and the small ops.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sglbatch.engine.layers.fused_cpu import TRACE_NAME as CPU_ELEMENTWISE_RANGE
from sglbatch.engine.layers.linear import TRACE_NAME as CPU_LINEAR_RANGE

CATEGORIES = {
    "linear": "linear layers (matmuls)",
    "attention": "attention",
    "gathers_kv_writes": "gathers, copies and KV writes",
    "other_model_ops": "other model ops (norms, rotary, activations)",
    "sampling": "sampling",
    "prepare": "prepare (step inputs, forward batch, attention metadata)",
    "schedule": "scheduling",
    "output_processing": "output processing",
    "device_wait": "waiting for the device (reading a launched step's tokens)",
    "python": "other Python (between ops, step glue)",
}
_PHASES = {"sglbatch.schedule": "schedule", "sglbatch.prepare": "prepare",
           "sglbatch.sample": "sampling", "sglbatch.input_logprobs": "sampling",
           "sglbatch.process_output": "output_processing",
           "sglbatch.wait_device": "device_wait",
           "sglbatch.attention_backend": "attention",
           # The CPU's fused norm and rope kernels (engine.layers.fused_cpu).
           CPU_ELEMENTWISE_RANGE: "other_model_ops",
           # The CPU's bf16 linear kernel (engine.layers.linear), SwiGLU included.
           CPU_LINEAR_RANGE: "linear",
           "sglbatch.forward_extend": "forward", "sglbatch.forward_decode": "forward"}
_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
            "aten::linear", "mkldnn::_linear_pointwise", "aten::_weight_int4pack_mm")
_MEMORY = ("aten::index", "aten::gather", "aten::scatter", "aten::copy_", "aten::clone",
           "aten::contiguous", "aten::embedding", "aten::take", "aten::cat", "aten::stack")


@dataclass
class _Event:
    name: str
    start: float  # us
    dur: float
    children: list[_Event] = field(default_factory=list)

    @property
    def self_time(self) -> float:
        return max(0.0, self.dur - sum(c.dur for c in self.children))

    def names(self) -> Iterator[str]:
        yield self.name
        for child in self.children:
            yield from child.names()


def _roots(events: list[dict[str, Any]]) -> list[_Event]:
    """Complete ("X") CPU events nested by time, per thread; the top-level ones."""
    by_thread: dict[Any, list[_Event]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(
                _Event(e["name"], float(e["ts"]), float(e.get("dur", 0))))
    roots = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda ev: (ev.start, -ev.dur))
        stack: list[_Event] = []
        for ev in thread_events:
            while stack and ev.start >= stack[-1].start + stack[-1].dur:
                stack.pop()
            (stack[-1].children if stack else roots).append(ev)
            stack.append(ev)
    return roots


def _category(phase: str, op: str | None) -> str:
    if phase == "attention":
        return "gathers_kv_writes" if op is not None and op.startswith(_MEMORY) else "attention"
    if phase == "forward":
        if op is None:
            return "python"
        if op.startswith(_MATMULS):
            return "linear"
        return "gathers_kv_writes" if op.startswith(_MEMORY) else "other_model_ops"
    return phase


def _attribute(ev: _Event, phase: str, op: str | None, totals: dict[str, float]) -> None:
    if ev.name in _PHASES:
        phase, op = _PHASES[ev.name], None
    elif not ev.name.startswith("sglbatch.") and op is None:
        op = ev.name  # the outermost op under the phase classifies its whole subtree
    totals[_category(phase, op)] += ev.self_time
    for child in ev.children:
        _attribute(child, phase, op, totals)


def _steps(roots: list[_Event]) -> Iterator[_Event]:
    for ev in roots:
        if ev.name == "sglbatch.step":
            yield ev
        else:
            yield from _steps(ev.children)


def step_breakdown(trace_path: Path, decode_only: bool = False) -> dict[str, Any]:
    """Share and ms per step of each category (`CATEGORIES`) over the trace's engine steps
    (`decode_only`: the steps that ran a decode forward)."""
    with trace_path.open() as f:
        roots = _roots(json.load(f)["traceEvents"])
    steps = [s for s in _steps(roots)
             if not decode_only or "sglbatch.forward_decode" in set(s.names())]
    if not steps:
        raise ValueError(f"no engine step recorded in {trace_path}")
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for step in steps:
        _attribute(step, "python", None, totals)
    total = sum(s.dur for s in steps)
    return {"steps": len(steps), "step_ms": total / len(steps) / 1e3,
            "shares": {k: v / total for k, v in totals.items()},
            "ms_per_step": {k: v / len(steps) / 1e3 for k, v in totals.items()},
            "trace": str(trace_path)}


def profile_steps(engine: Any, run: Any, num_steps: int | None = None) -> Path:
    """Run `run()` with the engine thread profiled (for at most `num_steps` steps); the
    trace's path."""
    path = engine.start_profile(num_steps=num_steps)
    run()
    try:
        engine.stop_profile()
    except ValueError:  # num_steps reached: the engine thread already wrote the trace
        pass
    return path


def print_breakdown(console: Any, breakdown: dict[str, Any], title: str) -> None:
    from rich.table import Table

    table = Table(title=title, caption=f"{breakdown['steps']} steps, "
                  f"{breakdown['step_ms']:.2f} ms per step under the profiler "
                  f"(trace: {breakdown['trace']})")
    for column in ("category", "ms per step", "share"):
        table.add_column(column, justify="left" if column == "category" else "right")
    for key, label in CATEGORIES.items():
        table.add_row(label, f"{breakdown['ms_per_step'][key]:.3f}",
                      f"{breakdown['shares'][key]:.1%}")
    console.print(table)
