"""`sglbatch` command line (click). Subcommands grow as features land (serve, run, bench,
eval).

Parsing and running are two steps: each command's callback returns its parameters (its
groups' too) as a namespace whose `func` runs the command, so `main` sets up logging in
between, and `profile` parses the command it profiles before it starts the profiler.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import click

from sglbatch.bench import offline, one_batch, profile, serving, step_cost
from sglbatch.cli_base import Command, Group
from sglbatch.config_flags import dataclass_kwargs, dataclass_options
from sglbatch.engine.config import EngineConfig
from sglbatch.eval import gsm8k_command
from sglbatch.server.args import ServerArgs

ENGINE_OPTIONS = {"Engine options": dataclass_options(EngineConfig)}


def engine_kwargs(args: SimpleNamespace) -> dict[str, Any]:
    return dataclass_kwargs(args, EngineConfig)


def _cmd_generate(args: SimpleNamespace) -> int:
    from rich.console import Console

    from sglbatch.engine.api_types import GenerateRequest
    from sglbatch.engine.engine import Engine
    from sglbatch.engine.sampling_params import SamplingParams

    console = Console()
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    prompts = args.prompt or ["What is the capital of France?"]
    requests = [GenerateRequest(messages=[{"role": "user", "content": p}], sampling_params=params)
                if args.chat else GenerateRequest(prompt=p, sampling_params=params)
                for p in prompts]
    with console.status("loading the model..."):
        engine = Engine(**engine_kwargs(args))
    with engine:
        start = time.perf_counter()
        outputs = engine.run(requests)
        elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        if args.json:
            print(json.dumps({"prompt": prompt, **out.to_json()}))
        else:
            console.rule(f"[bold]{prompt}")
            console.print(out.text, markup=False, highlight=False)
    if not args.json:
        tokens = sum(o.meta_info.completion_tokens for o in outputs)
        console.print(f"[dim]{len(outputs)} prompt(s), {tokens} tokens in {elapsed:.2f}s "
                      f"({tokens / elapsed:.1f} tokens/s)")
    return 0


def _cmd_serve(args: SimpleNamespace) -> int:
    from sglbatch.server.launch import serve

    serve(ServerArgs(**dataclass_kwargs(args, ServerArgs)), engine_kwargs(args))
    return 0


def _cmd_bench_offline(args: SimpleNamespace) -> int:
    offline.run(args, engine_kwargs(args))
    return 0


def _cmd_bench_serving(args: SimpleNamespace) -> int:
    return serving.run(args)


def _cmd_bench_one_batch(args: SimpleNamespace) -> int:
    one_batch.run(args, engine_kwargs(args))
    return 0


def _cmd_bench_step_cost(args: SimpleNamespace) -> int:
    step_cost.run(args, engine_kwargs(args))
    return 0


def _cmd_profile(args: SimpleNamespace) -> int:
    return profile.run(args, parse_args)


def _cmd_eval_gsm8k(args: SimpleNamespace) -> int:
    gsm8k_command.run(args, engine_kwargs(args))
    return 0


def _cmd_run(args: SimpleNamespace) -> int:
    from rich.console import Console

    from sglbatch.jobs.command import parse_shard, run_jobs

    return run_jobs(args.jobs, parse_shard(args.shard), args.dry_run, Console(stderr=True),
                    args.executor)


def _cmd_merge(args: SimpleNamespace) -> int:
    from rich.console import Console

    from sglbatch.jobs.command import merge_jobs

    return merge_jobs(args.jobs, args.shards, Console(stderr=True))


def _command(name: str, func: Callable[[SimpleNamespace], int],
             sections: dict[str, list[click.Parameter]], summary: str, description: str,
             **attrs: Any) -> Command:
    """A subcommand whose callback returns what `main` runs: `func` and the parameters."""

    def callback(**_: Any) -> SimpleNamespace:
        ctx: click.Context | None = click.get_current_context()
        values: dict[str, Any] = {}
        while ctx is not None:  # the subcommand's parameters, then its groups'
            values = {**ctx.params, **values}
            ctx = ctx.parent
        # Many-valued parameters come as tuples; the commands take lists.
        return SimpleNamespace(func=func, **{k: list(v) if isinstance(v, tuple) else v
                                             for k, v in values.items()})

    return Command(name, sections, callback=callback, short_help=summary, help=description,
                   **attrs)


cli = Group("sglbatch", help="Run LLMs over datasets; benchmark LLM serving.", params=[
    click.Option(["--log-level"], default="warning", help="debug | info | warning | error")],
    context_settings={"help_option_names": ["-h", "--help"]})  # subcommands inherit it

cli.add_command(_command(
    "generate", _cmd_generate, {
        "Options": [
            click.Argument(["prompt"], nargs=-1,
                           help="prompt(s); a sample question if none"),
            click.Option(["--max-new-tokens"], type=int, default=64, help="(default: 64)"),
            click.Option(["--temperature"], type=float, default=0.0, help="0 = greedy"),
            click.Option(["--raw", "chat"], is_flag=True, flag_value=False, default=True,
                         help="send prompts as plain text instead of chat messages"),
            click.Option(["--json"], is_flag=True, help="print one JSON result per line")],
        **ENGINE_OPTIONS},
    summary="generate text for a few prompts (a quick check of a model)",
    description="Generate completions for prompts given on the command line. By default the "
                "prompts go through the model's chat template."))

cli.add_command(_command(
    "run", _cmd_run, {"Options": [
        click.Argument(["jobs"], help="the job file (YAML)"),
        click.Option(["--shard"], help="i/n: run rows whose index % n == i, writing "
                     "<output>.shard-i-of-n; under a SLURM array the shard comes from "
                     "SLURM_ARRAY_TASK_ID/COUNT"),
        click.Option(["--dry-run"], is_flag=True,
                     help="validate the file and show the first rendered requests; no model "
                          "runs"),
        click.Option(["--executor"], type=click.Choice(["local", "ray"]),
                     help="replaces every job's `executor`: local (this process's engine) or "
                          "ray (engine replicas on a Ray cluster; pip install "
                          "\"sglbatch[ray]\")")]},
    summary="run the jobs of a YAML file over their datasets (resumable)",
    description="Stream each job's input rows through the model and write one record per row "
                "(id, text, meta_info, kept columns; or id and error). Rows sharing a prompt "
                "prefix run together so the prefix cache computes it once. Finished rows are "
                "committed in atomic chunks: a killed run started again (mode: resume) skips "
                "them and finishes the rest. See jobs/ for commented examples."))

cli.add_command(_command(
    "merge", _cmd_merge, {"Options": [
        click.Argument(["jobs"], help="the job file (YAML) the shards ran"),
        click.Option(["--shards"], type=int, required=True, help="n, the number of shards")]},
    summary="join the shard outputs of a job file, checking each row is there once",
    description="After `sglbatch run --shard i/n` for every i, join the parts into each job's "
                "output path (sorted by input position) and fail on duplicates or a "
                "shortfall."))

cli.add_command(_command(
    "serve", _cmd_serve, {"Server options": dataclass_options(ServerArgs), **ENGINE_OPTIONS},
    summary="serve the model over HTTP: SGLang's native API and the OpenAI API",
    description="Load the model and serve SGLang's native API (/generate, /health, /metrics, "
                "...) and the OpenAI API (/v1/chat/completions, /v1/completions, "
                "/v1/embeddings, /v1/files, /v1/batches) until SIGINT/SIGTERM, which let "
                "running requests finish. Prints the URL once it accepts connections."))

bench = Group("bench", help="benchmarks")
cli.add_command(bench)
bench.add_command(_command(
    "offline", _cmd_bench_offline, {**offline.SECTIONS, **ENGINE_OPTIONS},
    summary="throughput of the in-process engine on a workload",
    description="Runs the in-process engine over a workload (greedy, each request generating "
                "exactly its output length) and reports requests/s, tokens/s, the cache hit "
                "rate and MFU, then a table of the run's time by step (prefill, and decode by "
                "batch size); --baseline transformers runs transformers `generate` on the same "
                "requests in the same run and prints the ratio."))
bench.add_command(_command(
    "one-batch", _cmd_bench_one_batch, {**one_batch.SECTIONS, **ENGINE_OPTIONS},
    summary="latency of one static batch through the model runner, no scheduler (as SGLang's "
            "bench_one_batch)",
    description="For each --batch-size x --input-len x --output-len: one prefill forward over "
                "the whole batch, then greedy decode steps; reports prefill latency and "
                "throughput, the median decode step and its throughput, and the total. "
                "--correct prints greedy outputs of fixed prompts instead."))
bench.add_command(_command(
    "step-cost", _cmd_bench_step_cost, {**step_cost.SECTIONS, **ENGINE_OPTIONS},
    summary="the engine's own cost per decode step, with a no-op model",
    description="Replaces the model's forward by a no-op (zero hidden states, fixed random "
                "logits; the sampler still runs) and, for each --batch-size, times decode steps "
                "at that batch size: the median step, the no-op forward, the engine's cost "
                "(the difference), and its split into scheduling, preparing the inputs, "
                "sampling, output processing and Python, from a torch profiler trace. "
                "--device-ms T makes launching a step return at once and reading its tokens "
                "wait until a simulated device has run it for T ms, as a GPU does: the "
                "overlap schedule then hides the engine's cost behind T, which "
                "--disable-overlap-schedule does not."))
bench.add_command(_command(
    "serving", _cmd_bench_serving, serving.SECTIONS,
    summary="online serving benchmark against a running server (as SGLang's bench_serving)",
    description="Sends a workload to a running server (sglbatch/SGLang /generate, or an "
                "OpenAI-compatible /v1/completions or /v1/chat/completions) at a Poisson "
                "request rate, streaming, and reports throughput, concurrency and TTFT / TPOT "
                "/ ITL / E2E latency percentiles; a comma-separated --request-rate sweeps "
                "several rates."))

cli.add_command(_command(
    "profile", _cmd_profile, profile.SECTIONS,
    summary="run a subcommand under torch.profiler and write a Chrome trace",
    description="sglbatch profile [--output-dir DIR] -- <subcommand> [args]: runs the "
                "subcommand (bench one-batch, bench offline, serve, run, ...) under "
                "torch.profiler, writes a Chrome/Perfetto trace JSON with the sglbatch.* ranges "
                "(scheduler phases, forward passes, layers), and prints the top ops by self "
                "CPU time. For serve the trace is written at shutdown.",
    # Everything from the subcommand's name on is the subcommand's, its options too.
    context_settings={"allow_interspersed_args": False}))

evals = Group("eval", help="accuracy evals")
cli.add_command(evals)
evals.add_command(_command(
    "gsm8k", _cmd_eval_gsm8k, {**gsm8k_command.SECTIONS, **ENGINE_OPTIONS},
    summary="k-shot GSM8K accuracy (in process, a server, or transformers)",
    description="Asks the first --num-questions GSM8K test questions after --num-shots worked "
                "examples, greedy, and scores the last number of each answer as SGLang's "
                "benchmark does (no number = invalid). Appends accuracy, invalid rate, latency "
                "and output throughput to --output-file and writes each question's answer "
                "beside it."))


def parse_args(argv: list[str] | None = None) -> SimpleNamespace:
    """The command line (default: sys.argv) parsed: the namespace whose `func` runs it. A
    usage error exits with status 2 and --help with 0, as click does on its own."""
    try:
        parsed = cli.main(argv, prog_name="sglbatch", standalone_mode=False)
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None
    if not isinstance(parsed, SimpleNamespace):  # --help: click's exit status
        raise SystemExit(parsed)
    return parsed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
