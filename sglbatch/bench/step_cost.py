"""`sglbatch bench step-cost`: what the engine itself costs per decode step, with the
model's forward replaced by a no-op (zero hidden states, fixed random logits) so that only
the engine's work is left: scheduling, preparing the step's inputs (step inputs, forward
batch, attention metadata), sampling (which still runs on full-vocabulary logits) and
output processing.

For each batch size, that many requests (random --input-len-token prompts, ignoring EOS)
decode together. First unprofiled: the median wall time of the decode steps at that batch
size, less the no-op forward's own time (timed around it), is the engine's cost. Then again
under the torch profiler for --profile-steps decode steps, whose trace divides the step
among the phases (`sglbatch.bench.breakdown`; the profiler adds its own overhead).

--device-ms T stands the no-op forward on a simulated asynchronous device that takes T ms
per step, as a GPU does: launching a step returns at once, and reading its tokens waits
until the device has run it (one step at a time, in launch order). Then the engine's cost
that the device does not hide is the step less T: the whole cost with
--disable-overlap-schedule, and only what exceeds T with the overlap schedule.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import torch

from sglbatch.bench.breakdown import profile_steps, step_breakdown
from sglbatch.cli_base import MultiValueOption
from sglbatch.engine.api_types import GenerateRequest
from sglbatch.engine.batch import ForwardMode
from sglbatch.engine.sampling_params import SamplingParams

SECTIONS = {"Options": [
    MultiValueOption(["--batch-size"], type=click.IntRange(min=1), default=[1, 64, 256],
                     help="decode batch sizes (default: 1 64 256)"),
    click.Option(["--input-len"], type=click.IntRange(min=1), default=16, show_default=True,
                 help="prompt tokens of each request"),
    click.Option(["--decode-steps"], type=click.IntRange(min=1), default=64, show_default=True,
                 help="decode steps timed at each batch size"),
    click.Option(["--profile-steps"], type=click.IntRange(min=1), default=16, show_default=True,
                 help="decode steps profiled at each batch size for the split"),
    click.Option(["--device-ms"], type=click.FloatRange(min=0), default=0.0,
                 show_default=True,
                 help="stand the no-op forward on a simulated asynchronous device taking "
                      "this long per step: the engine column is then the cost it does not "
                      "hide"),
    click.Option(["--output-file"], type=click.Path(path_type=Path),
                 help="append one JSONL record per batch size here"),
]}
# The phases of the split (`step_breakdown`'s names: short column labels); the rest of the
# step is the no-op forward.
PHASES = {"schedule": "sched", "prepare": "prep", "sampling": "sample",
          "output_processing": "output", "device_wait": "wait", "python": "python"}


class NoOpModel:
    """Stands in for a runner's model: zeros for hidden states, fixed random logits (one
    row per request at most: no input logprobs are asked for), and the time spent in it."""

    def __init__(self, runner: Any, max_rows: int):
        config = runner.model_config
        self.hidden_size = config.hidden_size
        self.dtype, self.device = runner.dtype, runner.device
        logits = torch.randn(max_rows, config.vocab_size,
                             generator=torch.Generator().manual_seed(0))
        self.logits = logits.to(self.dtype).to(self.device)
        self.seconds = 0.0

    def install(self, model: Any) -> None:
        # Instance attributes shadow the module's methods: the runner calls these.
        model.forward = self.forward
        model.compute_logits = self.compute_logits

    def forward(self, input_ids: torch.Tensor, *_: Any) -> torch.Tensor:
        start = time.perf_counter()
        hidden = torch.zeros(input_ids.shape[0], self.hidden_size, dtype=self.dtype,
                             device=self.device)
        self.seconds += time.perf_counter() - start
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.logits[:hidden.shape[0]]
        self.seconds += time.perf_counter() - start
        return logits


class SimulatedDevice:
    """Makes a runner's steps look asynchronous: `launch` returns at once, and reading a
    launched step's tokens waits until `seconds` after the device was free to start it."""

    def __init__(self, runner: Any, seconds: float):
        self.free_at = 0.0
        launch = runner.launch

        def launch_on_device(batch: Any) -> Any:
            launched = launch(batch)
            done = self.free_at = max(time.perf_counter(), self.free_at) + seconds
            read = launched.result

            def wait_then_read() -> Any:
                time.sleep(max(0.0, done - time.perf_counter()))
                return read()

            launched.result = wait_then_read
            return launched

        runner.launch = launch_on_device


class StepTimer:
    """Wraps an engine's `step` (called on its thread) and its scheduler's `schedule`: each
    step's wall time, no-op forward time, mode and batch size."""

    def __init__(self, engine: Any, model: NoOpModel):
        self.samples: list[tuple[float, float, ForwardMode | None, int]] = []
        self._batch: Any = None
        step, schedule = engine.step, engine.scheduler.schedule

        def timed_schedule() -> Any:
            self._batch = schedule()
            return self._batch

        def timed_step() -> None:
            self._batch, noop_before = None, model.seconds
            start = time.perf_counter()
            step()
            elapsed = time.perf_counter() - start
            batch = self._batch
            self.samples.append((elapsed, model.seconds - noop_before,
                                 batch.mode if batch else None, len(batch.reqs) if batch else 0))

        engine.scheduler.schedule = timed_schedule
        engine.step = timed_step

    def decode_steps(self, batch_size: int) -> list[tuple[float, float]]:
        return [(wall, noop) for wall, noop, mode, size in self.samples
                if mode == ForwardMode.DECODE and size == batch_size]


def _requests(batch_size: int, input_len: int, output_len: int, vocab_size: int,
              seed: int) -> list[GenerateRequest]:
    rng = random.Random(seed)
    return [GenerateRequest(input_ids=[rng.randrange(100, vocab_size) for _ in range(input_len)],
                            sampling_params=SamplingParams(temperature=0, ignore_eos=True,
                                                           max_new_tokens=output_len))
            for _ in range(batch_size)]


def measure(engine: Any, timer: StepTimer, batch_size: int, args: SimpleNamespace
            ) -> dict[str, Any]:
    vocab = engine.info.vocab_size
    timer.samples.clear()
    engine.flush_cache()
    # +1: the prefill samples the first token; every later one is a decode step.
    engine.run(_requests(batch_size, args.input_len, args.decode_steps + 1, vocab, batch_size))
    # Through the engine's inbox, so after its last step: that step's sample is in.
    engine.flush_cache()
    steps = timer.decode_steps(batch_size)
    if not steps:
        raise ValueError(f"no decode step ran at batch size {batch_size}: is "
                         "--max-running-requests or the KV cache too small?")
    step_ms = 1e3 * statistics.median(wall for wall, _ in steps)
    noop_ms = 1e3 * statistics.median(noop for _, noop in steps)
    engine_ms = step_ms - noop_ms - args.device_ms  # what the device does not hide
    requests = _requests(batch_size, args.input_len, args.profile_steps + 1, vocab,
                         batch_size + 1)
    profiled = step_breakdown(profile_steps(engine, lambda: engine.run(requests)),
                              decode_only=True)
    return {"batch_size": batch_size, "input_len": args.input_len, "decode_steps": len(steps),
            "step_ms": step_ms, "noop_forward_ms": noop_ms, "device_ms": args.device_ms,
            "engine_ms": engine_ms,
            "profiled": profiled}


def run(args: SimpleNamespace, engine_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    from rich.console import Console

    from sglbatch.engine.engine import Engine

    console = Console()
    kwargs = {**engine_kwargs, "disable_cuda_graph": True,  # graphs would replay the model
              "max_running_requests": max(engine_kwargs.get("max_running_requests") or 1,
                                          *args.batch_size)}
    with console.status("loading the model..."):
        engine = Engine(**kwargs)
    records = []
    with engine:
        model = NoOpModel(engine.model_runner, max(args.batch_size))
        model.install(engine.model_runner.model)
        if args.device_ms:
            SimulatedDevice(engine.model_runner, args.device_ms / 1e3)
        timer = StepTimer(engine, model)
        for bs in args.batch_size:
            with console.status(f"decode steps at batch size {bs}..."):
                records.append(measure(engine, timer, bs, args))
    _print_table(console, records)
    if args.output_file:
        with args.output_file.open("a") as f:
            for record in records:
                f.write(json.dumps({"engine_args": kwargs, **record}) + "\n")
    return records


def _print_table(console: Any, records: list[dict[str, Any]]) -> None:
    from rich.table import Table

    table = Table(title="bench step-cost: the engine's cost per decode step, no-op model (ms)",
                  caption="step, no-op forward (fwd), simulated device (dev), engine (step - "
                          "fwd - dev: the cost not hidden): medians of unprofiled steps; the "
                          "split (sched ... python) and its step (prof): under the torch "
                          "profiler")
    for column in ("batch", "step", "fwd", "dev", "engine", *PHASES.values(), "prof"):
        table.add_column(column, justify="right")
    for r in records:
        split = r["profiled"]["ms_per_step"]
        table.add_row(str(r["batch_size"]), f"{r['step_ms']:.2f}",
                      f"{r['noop_forward_ms']:.2f}", f"{r['device_ms']:.2f}",
                      f"{r['engine_ms']:.2f}",
                      *(f"{split[p]:.2f}" for p in PHASES), f"{r['profiled']['step_ms']:.2f}")
    console.print(table)
