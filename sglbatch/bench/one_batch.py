"""`sglbatch bench one-batch`: the latency of one static batch run straight through the model
runner, with no scheduler, as SGLang's `python -m sglang.bench_one_batch`.

For each (batch size, input length, output length): KV slots for every request's prompt and
output are taken up front, one extend (prefill) forward runs the whole batch, then
output_len - 1 decode steps (greedy, sampled by the engine's sampler). Reported as SGLang
does: prefill latency and throughput (batch * input_len / latency), the median decode step
latency and its throughput (batch / latency), and the total (batch * (input + output) / total
latency). A warm-up run (first combination, at most 32 output tokens) comes first, unreported.

`--correct` runs a few fixed prompts instead (prefilled in two parts, the first --cut-len
tokens then the rest on top of them, as SGLang's correctness test) and prints the prefill's
top next-token ids and the greedy continuation, to compare with transformers.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import torch

from sglbatch.cli_base import MultiValueOption
from sglbatch.engine.batch import Batch, ForwardMode, StepResult
from sglbatch.engine.request import Req
from sglbatch.engine.sampling_params import SamplingParams

# SGLang's correctness-test prompts.
DEFAULT_PROMPTS = [
    "The capital of France is",
    "The capital of the United Kindom is",
    "Today is a sunny day and I like",
]


SECTIONS = {"Options": [
    click.Option(["--run-name"], default="default", help="recorded in each result line"),
    MultiValueOption(["--batch-size"], type=int, default=[1],
                     help="one or more batch sizes (default: 1)"),
    MultiValueOption(["--input-len"], type=int, default=[1024],
                     help="one or more prompt lengths in tokens (default: 1024)"),
    MultiValueOption(["--output-len"], type=int, default=[16],
                     help="one or more output lengths in tokens (default: 16)"),
    click.Option(["--result-filename"], type=click.Path(path_type=Path),
                 help="append one JSON line per (batch, input, output) combination"),
    click.Option(["--seed"], type=int, default=1,
                 help="seed of the random synthetic prompts (default: 1)"),
    click.Option(["--log-decode-step"], type=int, default=0,
                 help="print every N-th decode step's latency (default: 0, off)"),
    click.Option(["--correct", "--correctness-test", "correct"], is_flag=True,
                 help="correctness mode: fixed prompts, print the prefill's top next tokens "
                      "and the greedy output (first --output-len value)"),
    click.Option(["--cut-len"], type=int, default=4,
                 help="--correct: prefill this many prompt tokens first, then the rest as an "
                      "extend on top of them (default: 4; 0 = one prefill)"),
    click.Option(["--prompt-filename"], type=click.Path(path_type=Path),
                 help="--correct: prompts, one per line (default: three fixed prompts)"),
]}


def load_model(engine_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """A model runner and its tokenizer, built from engine arguments (no engine thread)."""
    from sglbatch.engine.config import EngineConfig
    from sglbatch.engine.model_runner import ModelRunner
    from sglbatch.engine.model_source import resolve_model_path
    from sglbatch.engine.tokenizer import Tokenizer

    config = EngineConfig.from_kwargs(**engine_kwargs)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model_dir = resolve_model_path(config.model_path)
    return ModelRunner(config, model_dir), Tokenizer(model_dir)


class StaticBatch:
    """Requests driven through a `ModelRunner` by hand: every request's KV slots (prompt and
    `output_len` outputs) are taken from the runner's CacheManager at construction, and
    given back by `free`. No scheduler, no prefix cache."""

    def __init__(self, runner: Any, input_ids: list[list[int]], output_len: int):
        self.runner = runner
        memory = runner.memory
        if len(input_ids) > memory.req_to_token.num_free:
            raise ValueError(f"{len(input_ids)} requests, {memory.req_to_token.num_free} "
                             "request rows free (raise --max-running-requests)")
        self.lengths = [len(ids) + output_len for ids in input_ids]
        if sum(self.lengths) > memory.kv_pool.num_free:
            raise ValueError(f"KV pool: {sum(self.lengths)} slots needed, "
                             f"{memory.kv_pool.num_free} free")
        params = SamplingParams(temperature=0, max_new_tokens=output_len, ignore_eos=True)
        self.reqs = [Req(str(i), list(ids), params) for i, ids in enumerate(input_ids)]
        for req, length in zip(self.reqs, self.lengths):
            memory.claim(req, max_prefix=0)
            memory.extend(req, length)
        memory.commit()

    def _batch(self, mode: ForwardMode, reqs: list[Req], lens: list[int]) -> Batch:
        rows = self.runner.memory.req_to_token.host
        locs = torch.cat([rows[r.req_pool_idx, r.kv_len:r.kv_len + n]
                          for r, n in zip(reqs, lens)])
        return Batch(mode, reqs, lens, locs)

    def _advance(self, batch: Batch, next_ids: list[int]) -> None:
        for i, (req, n) in enumerate(zip(batch.reqs, batch.extend_lens)):
            sampled = batch.samples(i)
            req.kv_len += n
            if sampled:
                req.output_ids.append(next_ids[i])

    def _pending(self, mode: ForwardMode, upto: list[int] | None) -> Batch:
        """Each request's pending tokens, or only those before position `upto[i]`."""
        reqs, lens = [], []
        for i, req in enumerate(self.reqs):
            end = req.fill_len if upto is None else upto[i]
            if end > req.kv_len:
                reqs.append(req)
                lens.append(end - req.kv_len)
        return self._batch(mode, reqs, lens)

    def extend(self, upto: list[int] | None = None) -> StepResult:
        """One extend forward + sampling over the pending prompt tokens (only those before
        `upto[i]` when given: a first part, whose sampled token is dropped)."""
        batch = self._pending(ForwardMode.EXTEND, upto)
        result = self.runner.forward_and_sample(batch)
        self._advance(batch, result.next_ids)
        return result

    def decode(self) -> StepResult:
        batch = self._batch(ForwardMode.DECODE, self.reqs, [1] * len(self.reqs))
        result = self.runner.forward_and_sample(batch)
        self._advance(batch, result.next_ids)
        return result

    def logits_step(self, mode: ForwardMode, upto: list[int] | None = None) -> torch.Tensor:
        """As `extend` / `decode`, but greedy from the model's logits, which are returned
        (fp32, one row per request that ran)."""
        batch = self._pending(mode, upto)
        logits = self.runner.forward(batch).float()
        self._advance(batch, logits.argmax(dim=-1).tolist())
        return logits

    def free(self) -> None:
        for req, length in zip(self.reqs, self.lengths):
            self.runner.memory.discard(req, length)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_input_ids(batch_size: int, input_len: int, vocab_size: int,
                        seed: int) -> list[list[int]]:
    """Random prompt ids as SGLang's (uniform below 10000), seeded."""
    rng = random.Random(seed)
    high = min(10000, vocab_size)
    return [[rng.randrange(high) for _ in range(input_len)] for _ in range(batch_size)]


def skip_reason(runner: Any, batch_size: int, input_len: int, output_len: int) -> str | None:
    if input_len < 1 or output_len < 1 or batch_size < 1:
        return "batch size, input and output lengths must be >= 1"
    if input_len + output_len > runner.context_len:
        return f"input + output is over the context length {runner.context_len}"
    if batch_size > runner.req_to_token_pool.num_rows:
        return (f"over the {runner.req_to_token_pool.num_rows} request rows "
                f"(raise --max-running-requests)")
    if batch_size * (input_len + output_len) > runner.kv_pool.num_slots:
        return (f"needs {batch_size * (input_len + output_len)} KV slots, the pool has "
                f"{runner.kv_pool.num_slots} (raise --kv-cache-gb or --max-total-tokens)")
    return None


def run_once(runner: Any, input_ids: list[list[int]], output_len: int, run_name: str = "default",
             log_decode_step: int = 0, log: Any = None) -> dict[str, Any]:
    """One static batch: prefill, then output_len - 1 decode steps. SGLang's result record."""
    batch_size, input_len = len(input_ids), len(input_ids[0])
    device = runner.device
    static = StaticBatch(runner, input_ids, output_len)
    try:
        _synchronize(device)
        tic = time.perf_counter()
        static.extend()
        _synchronize(device)
        prefill_latency = time.perf_counter() - tic
        decode_latencies = []
        for step in range(output_len - 1):
            tic = time.perf_counter()
            static.decode()
            _synchronize(device)
            decode_latencies.append(time.perf_counter() - tic)
            if log is not None and log_decode_step > 0 and step % log_decode_step == 0:
                log(f"decode {step}: batch {batch_size}, {decode_latencies[-1] * 1e3:.2f} ms, "
                    f"{batch_size / decode_latencies[-1]:.1f} tok/s")
        assert all(len(r.output_ids) == output_len for r in static.reqs)
    finally:
        static.free()
    total = prefill_latency + sum(decode_latencies)
    record: dict[str, Any] = {
        "run_name": run_name, "batch_size": batch_size, "input_len": input_len,
        "output_len": output_len, "prefill_latency": prefill_latency,
        "prefill_throughput": batch_size * input_len / prefill_latency,
    }
    if decode_latencies:
        median = statistics.median(decode_latencies)
        record["median_decode_latency"] = median
        record["median_decode_throughput"] = batch_size / median
    record["total_latency"] = total
    record["overall_throughput"] = batch_size * (input_len + output_len) / total
    return record


def latency_test(runner: Any, batch_sizes: list[int], input_lens: list[int],
                 output_lens: list[int], run_name: str = "default", seed: int = 1,
                 warmup: bool = True, log_decode_step: int = 0,
                 log: Any = None) -> list[dict[str, Any]]:
    """Every (batch size, input length, output length) combination, after a warm-up run."""
    vocab = runner.model_config.vocab_size
    combos = list(itertools.product(batch_sizes, input_lens, output_lens))
    if warmup:
        bs, il, ol = combos[0]
        if skip_reason(runner, bs, il, ol) is None:
            run_once(runner, synthetic_input_ids(bs, il, vocab, seed), min(32, ol))
    results = []
    for bs, il, ol in combos:
        reason = skip_reason(runner, bs, il, ol)
        if reason is not None:
            if log is not None:
                log(f"skipping (batch {bs}, input {il}, output {ol}): {reason}")
            continue
        record = run_once(runner, synthetic_input_ids(bs, il, vocab, seed), ol, run_name,
                          log_decode_step, log)
        record["dtype"] = str(runner.dtype).removeprefix("torch.")
        record["device"] = str(runner.device)
        results.append(record)
        if log is not None:
            log(_summary_line(record))
    return results


def _summary_line(r: dict[str, Any]) -> str:
    line = (f"batch {r['batch_size']}, input {r['input_len']}, output {r['output_len']}: "
            f"prefill {r['prefill_latency']:.4f} s ({r['prefill_throughput']:.1f} tok/s)")
    if "median_decode_latency" in r:
        line += (f", decode median {r['median_decode_latency'] * 1e3:.2f} ms "
                 f"({r['median_decode_throughput']:.1f} tok/s)")
    return line + f", total {r['total_latency']:.3f} s ({r['overall_throughput']:.1f} tok/s)"


@dataclass
class CorrectnessResult:
    prompt: str
    input_ids: list[int]
    prefill_top_ids: list[int]  # the final prefill's next-token logits, best first
    prefill_top_logits: list[float]
    output_ids: list[int]  # greedy, output_len tokens (EOS does not stop it)
    text: str


def correctness_test(runner: Any, tokenizer: Any, prompts: list[str], output_len: int,
                     cut_len: int = 4, top_k: int = 5) -> list[CorrectnessResult]:
    """The prompts as one static batch: prefill the first `cut_len` tokens of each (at most
    all but one), extend the rest on top of the cached part, then greedy-decode; `output_len`
    tokens per prompt, from the model's logits."""
    input_ids = [tokenizer.encode(p) for p in prompts]
    if any(not ids for ids in input_ids):
        raise ValueError("--correct: a prompt encodes to no tokens")
    static = StaticBatch(runner, input_ids, output_len)
    try:
        cuts = [min(max(cut_len, 0), len(ids) - 1) for ids in input_ids]
        if any(cuts):
            static.logits_step(ForwardMode.EXTEND, upto=cuts)
        logits = static.logits_step(ForwardMode.EXTEND)
        top = logits.topk(top_k, dim=-1)
        for _ in range(output_len - 1):
            static.logits_step(ForwardMode.DECODE)
        outputs = [list(r.output_ids) for r in static.reqs]
    finally:
        static.free()
    return [CorrectnessResult(prompt, ids, top.indices[i].tolist(), top.values[i].tolist(),
                              out, tokenizer.decode(out, skip_special_tokens=False))
            for i, (prompt, ids, out) in enumerate(zip(prompts, input_ids, outputs))]


def run(args: SimpleNamespace, engine_kwargs: dict[str, Any]) -> list[Any]:
    from rich.console import Console

    console = Console()
    with console.status("loading the model..."):
        runner, tokenizer = load_model(engine_kwargs)
    console.print(f"[dim]{runner.model_dir.name}: {runner.dtype}, {runner.device}, attention "
                  f"{type(runner.attn_backend).__name__}, KV pool {runner.kv_pool.num_slots} "
                  f"tokens")
    if args.correct:
        return _run_correct(console, args, runner, tokenizer)

    def log(message: str) -> None:
        console.print(f"[dim]{message}", highlight=False)

    with console.status("warm-up, then the runs..."):
        results = latency_test(runner, args.batch_size, args.input_len, args.output_len,
                               args.run_name, args.seed, log_decode_step=args.log_decode_step,
                               log=log)
    print_table(console, results, args.run_name)
    if args.result_filename and results:
        with args.result_filename.open("a") as f:
            for record in results:
                f.write(json.dumps(record) + "\n")
        console.print(f"[dim]appended {len(results)} line(s) to {args.result_filename}")
    return results


def _run_correct(console: Any, args: SimpleNamespace, runner: Any,
                 tokenizer: Any) -> list[CorrectnessResult]:
    prompts = DEFAULT_PROMPTS
    if args.prompt_filename:
        if not args.prompt_filename.is_file():
            raise ValueError(f"--prompt-filename {args.prompt_filename}: no such file")
        prompts = [line.rstrip("\n") for line in args.prompt_filename.read_text().splitlines()
                   if line.strip()]
        if not prompts:
            raise ValueError(f"--prompt-filename {args.prompt_filename}: no prompts")
    results = correctness_test(runner, tokenizer, prompts, args.output_len[0], args.cut_len)
    for i, r in enumerate(results):
        console.rule(f"prompt {i}")
        console.print(f"input_ids={r.input_ids}", highlight=False)
        tops = ", ".join(f"{t} {tokenizer.decode([t], skip_special_tokens=False)!r} "
                         f"({v:.3f})" for t, v in zip(r.prefill_top_ids, r.prefill_top_logits))
        console.print(f"prefill next-token top ids: {tops}", markup=False, highlight=False)
        console.print(f"output_ids={r.output_ids}", highlight=False)
        console.print(r.prompt + r.text, markup=False, highlight=False)
    return results


def print_table(console: Any, results: list[dict[str, Any]], run_name: str) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"bench one-batch: {run_name} (decode: the median step)",
                  box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for column in ("batch", "input", "output", "prefill\ns", "prefill\ntok/s", "decode\nms",
                   "decode\ntok/s", "total\ns", "overall\ntok/s"):
        table.add_column(column, justify="right")
    for r in results:
        decode = r.get("median_decode_latency")
        table.add_row(
            str(r["batch_size"]), str(r["input_len"]), str(r["output_len"]),
            f"{r['prefill_latency']:.3f}", f"{r['prefill_throughput']:.0f}",
            "-" if decode is None else f"{decode * 1e3:.1f}",
            "-" if decode is None else f"{r['median_decode_throughput']:.1f}",
            f"{r['total_latency']:.2f}", f"{r['overall_throughput']:.0f}")
    console.print(table)
