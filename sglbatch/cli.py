"""`sglbatch` command line. Subcommands grow as features land (serve, run, bench, eval)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from sglbatch.config_flags import add_dataclass_args, dataclass_kwargs
from sglbatch.engine.config import EngineConfig
from sglbatch.server.args import ServerArgs


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, EngineConfig, "engine")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dataclass_kwargs(args, EngineConfig)


def _cmd_generate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sglbatch.engine.engine import Engine

    console = Console()
    params = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    prompts = args.prompt or ["What is the capital of France?"]
    with console.status("loading the model..."):
        engine = Engine(**engine_kwargs(args))
    with engine:
        key = "messages" if args.chat else "prompt"
        batch = [[{"role": "user", "content": p}] for p in prompts] if args.chat else prompts
        start = time.perf_counter()
        outputs = engine.generate(**{key: batch}, sampling_params=params)
        elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, **out}))
        else:
            console.rule(f"[bold]{prompt}")
            console.print(out["text"], markup=False, highlight=False)
    if not args.json:
        tokens = sum(o["meta_info"]["completion_tokens"] for o in outputs)
        console.print(f"[dim]{len(outputs)} prompt(s), {tokens} tokens in {elapsed:.2f}s "
                      f"({tokens / elapsed:.1f} tokens/s)")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from sglbatch.server.launch import serve

    serve(ServerArgs(**dataclass_kwargs(args, ServerArgs)), engine_kwargs(args))
    return 0


def _cmd_bench_offline(args: argparse.Namespace) -> int:
    from sglbatch.bench.offline import run

    run(args, engine_kwargs(args))
    return 0


def _cmd_bench_serving(args: argparse.Namespace) -> int:
    from sglbatch.bench.serving import run

    return run(args)


def _cmd_bench_one_batch(args: argparse.Namespace) -> int:
    from sglbatch.bench.one_batch import run

    run(args, engine_kwargs(args))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from sglbatch.bench.profile import run

    return run(args, build_parser().parse_args)


def _cmd_eval_gsm8k(args: argparse.Namespace) -> int:
    from sglbatch.eval.gsm8k_command import run

    run(args, engine_kwargs(args))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sglbatch.jobs.command import parse_shard, run_jobs

    return run_jobs(args.jobs, parse_shard(args.shard), args.dry_run, Console(stderr=True))


def _cmd_merge(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sglbatch.jobs.command import merge_jobs

    return merge_jobs(args.jobs, args.shards, Console(stderr=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sglbatch", description="Run LLMs over datasets; benchmark LLM serving.")
    parser.add_argument("--log-level", default="warning", help="debug | info | warning | error")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="generate text for a few prompts (a quick check of a model)",
        description="Generate completions for prompts given on the command line. By default "
                    "the prompts go through the model's chat template.")
    gen.add_argument("prompt", nargs="*", help="prompt(s); a sample question if none")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="(default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--raw", dest="chat", action="store_false",
                     help="send prompts as plain text instead of chat messages")
    gen.add_argument("--json", action="store_true", help="print one JSON result per line")
    add_engine_args(gen)
    gen.set_defaults(func=_cmd_generate)

    run = sub.add_parser(
        "run", help="run the jobs of a YAML file over their datasets (resumable)",
        description="Stream each job's input rows through the model and write one record per "
                    "row (id, text, meta_info, kept columns; or id and error). Rows sharing a "
                    "prompt prefix run together so the prefix cache computes it once. Finished "
                    "rows are committed in atomic chunks: a killed run started again (mode: "
                    "resume) skips them and finishes the rest. See jobs/ for commented examples.")
    run.add_argument("jobs", help="the job file (YAML)")
    run.add_argument("--shard", help="i/n: run rows whose index %% n == i, writing "
                     "<output>.shard-i-of-n; under a SLURM array the shard comes from "
                     "SLURM_ARRAY_TASK_ID/COUNT")
    run.add_argument("--dry-run", action="store_true",
                     help="validate the file and show the first rendered requests; no model runs")
    run.set_defaults(func=_cmd_run)

    merge = sub.add_parser(
        "merge", help="join the shard outputs of a job file, checking each row is there once",
        description="After `sglbatch run --shard i/n` for every i, join the parts into each "
                    "job's output path (sorted by input position) and fail on duplicates or a "
                    "shortfall.")
    merge.add_argument("jobs", help="the job file (YAML) the shards ran")
    merge.add_argument("--shards", type=int, required=True, help="n, the number of shards")
    merge.set_defaults(func=_cmd_merge)

    serve = sub.add_parser(
        "serve", help="serve the model over HTTP: SGLang's native API and the OpenAI API",
        description="Load the model and serve SGLang's native API (/generate, /health, "
                    "/metrics, ...) and the OpenAI API (/v1/chat/completions, /v1/completions, "
                    "/v1/embeddings, /v1/files, /v1/batches) until SIGINT/SIGTERM, which let "
                    "running requests finish. Prints the URL once it accepts connections.")
    add_dataclass_args(serve, ServerArgs, "server")
    add_engine_args(serve)
    serve.set_defaults(func=_cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from sglbatch.bench import offline, one_batch, profile, serving
    from sglbatch.eval import gsm8k_command

    _subcommand(bench, "offline", offline.add_args, _cmd_bench_offline, engine=True,
                help="throughput of the in-process engine on a workload",
                description="Runs the in-process engine over a workload (greedy, each request "
                            "generating exactly its output length) and reports requests/s, "
                            "tokens/s and the cache hit rate; --baseline transformers runs "
                            "transformers `generate` on the same requests in the same run and "
                            "prints the ratio.")
    _subcommand(bench, "one-batch", one_batch.add_args, _cmd_bench_one_batch, engine=True,
                help="latency of one static batch through the model runner, no scheduler "
                     "(as SGLang's bench_one_batch)",
                description="For each --batch-size x --input-len x --output-len: one prefill "
                            "forward over the whole batch, then greedy decode steps; reports "
                            "prefill latency and throughput, the median decode step and its "
                            "throughput, and the total. --correct prints greedy outputs of "
                            "fixed prompts instead.")
    _subcommand(bench, "serving", serving.add_args, _cmd_bench_serving, engine=False,
                help="online serving benchmark against a running server (as SGLang's "
                     "bench_serving)",
                description="Sends a workload to a running server (sglbatch/SGLang /generate, "
                            "or an OpenAI-compatible /v1/completions or /v1/chat/completions) "
                            "at a Poisson request rate, streaming, and reports throughput, "
                            "concurrency and TTFT / TPOT / ITL / E2E latency percentiles; a "
                            "comma-separated --request-rate sweeps several rates.")
    _subcommand(sub, "profile", profile.add_args, _cmd_profile, engine=False,
                help="run a subcommand under torch.profiler and write a Chrome trace",
                description="sglbatch profile [--output-dir DIR] -- <subcommand> [args]: runs "
                            "the subcommand (bench one-batch, bench offline, serve, run, ...) "
                            "under torch.profiler, writes a Chrome/Perfetto trace JSON with the "
                            "sglbatch.* ranges (scheduler phases, forward passes, layers), and "
                            "prints the top ops by self CPU time. For serve the trace is "
                            "written at shutdown.")
    evals = sub.add_parser("eval", help="accuracy evals").add_subparsers(dest="eval",
                                                                         required=True)
    _subcommand(evals, "gsm8k", gsm8k_command.add_args, _cmd_eval_gsm8k, engine=True,
                help="k-shot GSM8K accuracy (in process, a server, or transformers)",
                description="Asks the first --num-questions GSM8K test questions after "
                            "--num-shots worked examples, greedy, and scores the last number "
                            "of each answer as SGLang's benchmark does (no number = invalid). "
                            "Appends accuracy, invalid rate, latency and output throughput to "
                            "--output-file and writes each question's answer beside it.")
    return parser


def _subcommand(subparsers: Any, name: str, add_args: Callable[[argparse.ArgumentParser], None],
                func: Callable[[argparse.Namespace], int], engine: bool, **texts: str) -> None:
    """A subcommand whose flags come from its module's `add_args` (and the engine's flags
    when it loads a model)."""
    parser = subparsers.add_parser(name, **texts)
    add_args(parser)
    if engine:
        add_engine_args(parser)
    parser.set_defaults(func=func)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        # The console keeps --log-level even while a job's log file takes INFO.
        handler.setLevel(args.log_level.upper())
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
