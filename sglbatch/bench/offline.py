"""`sglbatch bench offline`: the in-process engine over a workload, optionally against
transformers `generate` on the same requests in the same run."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from sglbatch.bench import datasets
from sglbatch.bench.ceiling import decode_ceiling, model_flops_per_token
from sglbatch.bench.datasets import BenchRequest


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset-name", default="random", choices=datasets.DATASETS,
                        help="workload (default: random)")
    parser.add_argument("--dataset-path", help="gsm8k: folder with train.jsonl and test.jsonl "
                        "(default: download from the public URL once)")
    parser.add_argument("--num-prompts", type=int, default=128, help="(default: 128)")
    parser.add_argument("--random-input-len", type=int, default=256, help="(default: 256)")
    parser.add_argument("--random-output-len", type=int, default=128, help="(default: 128)")
    parser.add_argument("--random-range-ratio", type=float, default=1.0,
                        help="lengths are uniform in [len * ratio, len] (default: 1.0)")
    parser.add_argument("--sharegpt-output-len", type=int,
                        help="sharegpt: output length for every request (default: the "
                             "conversation's reply length)")
    parser.add_argument("--sharegpt-context-len", type=int, default=2048,
                        help="sharegpt: skip conversations whose prompt + output exceed this "
                             "(default: 2048)")
    parser.add_argument("--gsp-num-groups", type=int, default=16, help="(default: 16)")
    parser.add_argument("--gsp-prompts-per-group", type=int, default=16, help="(default: 16)")
    parser.add_argument("--gsp-system-prompt-len", type=int, default=1024,
                        help="shared prefix length in tokens (default: 1024)")
    parser.add_argument("--gsp-question-len", type=int, default=64, help="(default: 64)")
    parser.add_argument("--gsp-output-len", type=int, default=64, help="(default: 64)")
    parser.add_argument("--num-shots", type=int, default=5, help="gsm8k: k-shot (default: 5)")
    parser.add_argument("--gsm8k-output-len", type=int, default=256,
                        help="gsm8k: max_new_tokens; outputs stop at \"Question\" "
                             "(default: 256)")
    parser.add_argument("--seed", type=int, default=1, help="(default: 1)")
    parser.add_argument("--baseline", choices=["transformers", "llama-cpp"],
                        help="also run a peer on the same requests: transformers `generate` "
                             "(batched, left padding) or llama.cpp's Python API on the same "
                             "GGUF (pip install llama-cpp-python; one sequence at a time)")
    parser.add_argument("--baseline-batch-sizes", default="16,64,128",
                        help="batch sizes tried for the baseline; the best counts "
                             "(default: 16,64,128)")
    parser.add_argument("--output-file", type=Path, help="append a JSONL result record here")


def build_requests(args: argparse.Namespace, engine: Any) -> list[BenchRequest]:
    vocab_size = engine.model_runner.model_config.vocab_size
    if args.dataset_name == "random":
        return datasets.random_requests(args.num_prompts, args.random_input_len,
                                        args.random_output_len, args.random_range_ratio,
                                        vocab_size, args.seed)
    if args.dataset_name == "generated-shared-prefix":
        return datasets.generated_shared_prefix_requests(
            args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
            args.gsp_question_len, args.gsp_output_len, vocab_size, args.seed)
    if args.dataset_name == "sharegpt":
        return datasets.sharegpt_requests(engine.tokenizer, args.num_prompts,
                                          args.sharegpt_context_len, args.sharegpt_output_len,
                                          args.seed)
    return datasets.gsm8k_requests(engine.tokenizer, args.dataset_path, args.num_prompts,
                                   args.num_shots, args.gsm8k_output_len)


def run_engine(engine: Any, requests: list[BenchRequest]) -> dict[str, float]:
    params = [{"temperature": 0, "max_new_tokens": r.output_len, "ignore_eos": r.ignore_eos,
               "stop": list(r.stop)} for r in requests]
    engine.generate(input_ids=[100, 200, 300], sampling_params={"max_new_tokens": 2})  # warm-up
    engine.flush_cache()
    start = time.perf_counter()
    outputs = engine.generate(input_ids=[r.input_ids for r in requests], sampling_params=params)
    elapsed = time.perf_counter() - start
    prompt_tokens = sum(o["meta_info"]["prompt_tokens"] for o in outputs)
    output_tokens = sum(o["meta_info"]["completion_tokens"] for o in outputs)
    cached = sum(o["meta_info"]["cached_tokens"] for o in outputs)
    return {
        "duration": elapsed,
        "completed": len(outputs),
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(outputs) / elapsed,
        "input_throughput": prompt_tokens / elapsed,
        "output_throughput": output_tokens / elapsed,
        "cache_hit_rate": cached / prompt_tokens if prompt_tokens else 0.0,
    }


def run(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console

    from sglbatch.engine.engine import Engine

    console = Console()
    with console.status("loading the model..."):
        engine = Engine(**engine_kwargs)
    with engine:
        requests = build_requests(args, engine)
        with console.status(f"sglbatch: {len(requests)} requests..."):
            result = run_engine(engine, requests)
        model_dir = engine.model_runner.model_dir
        dtype = engine.model_runner.dtype
        flops_per_token = model_flops_per_token(engine.model_runner.model)
    # Measured with the engine's thread gone: two threads running torch at once slow each other.
    ceiling = decode_ceiling(flops_per_token, dtype)
    dataset_args = {k: v for k, v in vars(args).items()
                     if k.split("_")[0] in ("dataset", "num", "random", "sharegpt", "gsp", "seed",
                                            "gsm8k")}
    record: dict[str, Any] = {
        "backend": "sglbatch", **dataset_args, "dtype": str(dtype).removeprefix("torch."),
        "engine_args": engine_kwargs, **result, "compute_ceiling": ceiling,
        "fraction_of_ceiling": result["output_throughput"] / ceiling["ceiling_tokens_per_s"]}
    if args.baseline == "transformers":
        record["baseline"] = _run_transformers(console, model_dir, dtype, requests,
                                           args.baseline_batch_sizes)
    elif args.baseline == "llama-cpp":
        record["baseline"] = _run_llamacpp(console, model_dir, requests)
    if args.baseline:
        record["speedup_vs_baseline"] = (
            result["output_throughput"] / record["baseline"]["output_throughput"])
    _print_table(console, record)
    if args.output_file:
        with args.output_file.open("a") as f:
            f.write(json.dumps(record) + "\n")
    return record


def _run_transformers(console: Any, model_dir: Path, dtype: Any, requests: list[BenchRequest],
                  batch_sizes: str) -> dict[str, Any]:
    from sglbatch.bench.transformers_baseline import run_transformers_generate

    per_batch = {}
    for bs in (int(b) for b in batch_sizes.split(",")):
        with console.status(f"transformers generate, batch size {bs}..."):
            seconds, tokens = run_transformers_generate(model_dir, dtype, requests, bs)
        per_batch[bs] = tokens / seconds
        console.print(f"transformers generate, batch {bs}: {per_batch[bs]:.1f} output tok/s")
    best = max(per_batch, key=per_batch.get)
    return {"name": "transformers", "best_batch_size": best,
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
    if "baseline" in record:
        base = record["baseline"]
        batch = f" (batch {base['best_batch_size']})" if "best_batch_size" in base else ""
        table.add_row(f"{base['name']} output_throughput{batch}",
                      f"{base['output_throughput']:.2f}")
        table.add_row(f"speedup vs {base['name']}", f"{record['speedup_vs_baseline']:.2f}x")
    console.print(table)
