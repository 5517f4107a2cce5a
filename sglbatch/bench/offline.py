"""`sglbatch bench offline`: the in-process engine over a workload, optionally against
transformers `generate` on the same requests in the same run.

MFU (model FLOPs utilisation): the tokens the model computed (prompt tokens not served from
the prefix cache, plus output tokens) times the model's FLOPs per token (its linear layers),
per second of the run, as a share of the matmul rate measured in the same run. A second
table splits the run's time by step: prefill, and decode by batch size (`step_sizes`).
`--breakdown` runs the workload a second time with the engine thread profiled and divides
its step time among linear layers, attention, gathers, sampling, scheduling... (see
`sglbatch.bench.breakdown`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from sglbatch.bench import datasets
from sglbatch.bench.breakdown import print_breakdown, profile_steps, step_breakdown
from sglbatch.bench.ceiling import decode_ceiling
from sglbatch.bench.datasets import BenchRequest
from sglbatch.bench.step_sizes import engine_stats, print_step_table, step_rows
from sglbatch.engine.api_types import GenerateRequest
from sglbatch.engine.sampling_params import SamplingParams

SECTIONS = {"Options": [
    *datasets.DATASET_OPTIONS,
    click.Option(["--baseline"], type=click.Choice(["transformers", "llama-cpp"]),
                 help="also run a peer on the same requests: transformers `generate` (batched, "
                      "left padding) or llama.cpp's Python API on the same GGUF (pip install "
                      "llama-cpp-python; one sequence at a time)"),
    click.Option(["--baseline-batch-sizes"], default="16,64,128",
                 help="batch sizes tried for the baseline; the best counts (default: 16,64,128)"),
    click.Option(["--output-file"], type=click.Path(path_type=Path),
                 help="append a JSONL result record here"),
    click.Option(["--breakdown"], is_flag=True,
                 help="run the workload again under the torch profiler and print the share "
                      "of engine step time in linear layers, attention, gathers and KV "
                      "writes, sampling, scheduling and Python (recorded as `breakdown`; the "
                      "trace goes to $SGLBATCH_TORCH_PROFILER_DIR or the temp dir)"),
    click.Option(["--breakdown-steps"], type=click.IntRange(min=1), default=256,
                 show_default=True,
                 help="profile at most this many engine steps (the first ones) for "
                      "--breakdown"),
]}


def build_requests(args: SimpleNamespace, engine: Any) -> list[BenchRequest]:
    return datasets.build_requests(args, engine.tokenizer, engine.info.vocab_size)


def generate_requests(requests: list[BenchRequest]) -> list[GenerateRequest]:
    return [GenerateRequest(input_ids=r.input_ids, sampling_params=SamplingParams(
        temperature=0, max_new_tokens=r.output_len, ignore_eos=r.ignore_eos, stop=list(r.stop)))
        for r in requests]


def run_engine(engine: Any, requests: list[BenchRequest]) -> dict[str, Any]:
    batch = generate_requests(requests)
    engine.run([GenerateRequest(input_ids=[100, 200, 300],  # warm-up
                                sampling_params=SamplingParams(max_new_tokens=2))])
    engine.flush_cache()
    stats_before = engine_stats(engine)
    start = time.perf_counter()
    outputs = engine.run(batch)
    elapsed = time.perf_counter() - start
    steps = step_rows(stats_before, engine_stats(engine))
    prompt_tokens = sum(o.meta_info.prompt_tokens for o in outputs)
    output_tokens = sum(o.meta_info.completion_tokens for o in outputs)
    cached = sum(o.meta_info.cached_tokens for o in outputs)
    return {
        "duration": elapsed,
        "completed": len(outputs),
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(outputs) / elapsed,
        "input_throughput": prompt_tokens / elapsed,
        "output_throughput": output_tokens / elapsed,
        "cache_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
        "computed_tokens": prompt_tokens - cached + output_tokens,
        "steps_by_batch_size": steps,
    }


def run(args: SimpleNamespace, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    import torch
    from rich.console import Console

    from sglbatch.engine.engine import Engine

    console = Console()
    with console.status("loading the model..."):
        engine = Engine(**engine_kwargs)
    with engine:
        requests = build_requests(args, engine)
        with console.status(f"sglbatch: {len(requests)} requests..."):
            result = run_engine(engine, requests)
        breakdown = None
        if args.breakdown:
            with console.status("sglbatch: the same requests under the profiler..."):
                engine.flush_cache()  # as the timed run: nothing cached
                trace_path = profile_steps(
                    engine, lambda: engine.run(generate_requests(requests)),
                    args.breakdown_steps)
                breakdown = step_breakdown(trace_path)
        info = engine.info
    model_dir, dtype, device = Path(info.model_dir), getattr(torch, info.dtype), info.device
    # Measured with the engine's thread gone: two threads running torch at once slow each other.
    ceiling = decode_ceiling(info.flops_per_token, dtype)
    dataset_args = datasets.dataset_record(args)
    record: dict[str, Any] = {
        "backend": "sglbatch", **dataset_args, "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "engine_args": engine_kwargs, **result, "compute_ceiling": ceiling,
        "fraction_of_ceiling": result["output_throughput"] / ceiling["ceiling_tokens_per_s"],
        "mfu": (result["computed_tokens"] * info.flops_per_token / result["duration"]
                / (ceiling["matmul_gflops"] * 1e9))}
    if breakdown is not None:
        record["breakdown"] = breakdown
    if args.baseline == "transformers":
        record["baseline"] = _run_transformers(console, model_dir, dtype, device, requests,
                                               args.baseline_batch_sizes)
    elif args.baseline == "llama-cpp":
        record["baseline"] = _run_llamacpp(console, model_dir, requests)
    if args.baseline:
        record["speedup_vs_baseline"] = (
            result["output_throughput"] / record["baseline"]["output_throughput"])
    _print_table(console, record)
    print_step_table(console, record["steps_by_batch_size"], record["duration"])
    if breakdown is not None:
        print_breakdown(console, breakdown, "bench offline --breakdown: share of engine step "
                                            "time")
    if args.output_file:
        with args.output_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def _run_transformers(console: Any, model_dir: Path, dtype: Any, device: Any,
                      requests: list[BenchRequest], batch_sizes: str) -> dict[str, Any]:
    from sglbatch.bench.transformers_baseline import (
        TransformersGenerator,
        run_transformers_generate,
    )

    with console.status("loading the model in transformers..."):
        generator = TransformersGenerator(model_dir, dtype, device)  # once for every batch size
    per_batch = {}
    for bs in (int(b) for b in batch_sizes.split(",")):
        with console.status(f"transformers generate, batch size {bs}..."):
            seconds, tokens = run_transformers_generate(generator, requests, bs)
        per_batch[bs] = tokens / seconds
        console.print(f"transformers generate, batch {bs}: {per_batch[bs]:.1f} output tok/s")
    best = max(per_batch, key=per_batch.get)
    return {"name": "transformers", "device": str(generator.model.device),
            "best_batch_size": best,
            "output_throughput": per_batch[best], "output_throughput_by_batch_size": per_batch}


def _run_llamacpp(console: Any, model_dir: Path, requests: list[BenchRequest]
                  ) -> dict[str, Any]:
    from sglbatch.bench.llamacpp_baseline import run_llamacpp
    from sglbatch.engine.model_source import gguf_source

    gguf = gguf_source(model_dir)
    if gguf is None:
        raise ValueError("--baseline llama-cpp needs a model loaded from a .gguf file "
                         "(or the alias smollm2-135m-instruct)")
    with console.status("llama.cpp, one sequence at a time..."):
        seconds, tokens = run_llamacpp(gguf, requests)
    return {"name": "llama-cpp", "output_throughput": tokens / seconds,
            "total_output_tokens": tokens, "duration": seconds}


def _print_table(console: Any, record: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"bench offline: {record['dataset_name']}, {record['completed']} "
                        f"requests, {record['dtype']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("duration", "total_input_tokens", "total_output_tokens", "request_throughput",
                "input_throughput", "output_throughput", "cache_hit_rate"):
        value = record[key]
        table.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
    ceiling = record["compute_ceiling"]
    table.add_row(f"compute ceiling ({ceiling['matmul_gflops']:.0f} GFLOP/s / "
                  f"{ceiling['model_mflops_per_token']:.0f} MFLOP per token)",
                  f"{ceiling['ceiling_tokens_per_s']:.0f} tok/s")
    table.add_row("output throughput / ceiling", f"{record['fraction_of_ceiling']:.1%}")
    table.add_row("MFU (prompt - cached + output tokens, of the matmul rate)",
                  f"{record['mfu']:.1%}")
    if record["mfu"] > 1:
        table.caption = ("MFU over 100%: the matmul rate was measured under more load than "
                         "the run had (a shared machine?)")
    if "baseline" in record:
        base = record["baseline"]
        batch = f" (batch {base['best_batch_size']})" if "best_batch_size" in base else ""
        table.add_row(f"{base['name']} output_throughput{batch}",
                      f"{base['output_throughput']:.2f}")
        table.add_row(f"speedup vs {base['name']}", f"{record['speedup_vs_baseline']:.2f}x")
    console.print(table)
