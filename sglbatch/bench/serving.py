"""`sglbatch bench serving`: an online serving benchmark in the manner of SGLang's
`python -m sglang.bench_serving`. Requests from a workload are sent to a running server at a
Poisson request rate (or all at once), optionally under a concurrency cap, and each one's TTFT,
inter-token latencies and end-to-end latency are measured on the client."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from sglbatch.bench import datasets
from sglbatch.bench.serving_backends import BACKENDS, NATIVE_BACKENDS

_WARMUP_MAX_TOKENS = 16


def parse_rates(text: str) -> list[float]:
    """`--request-rate`: one rate or a comma-separated sweep, each > 0 or `inf`."""
    rates = []
    for part in str(text).split(","):
        try:
            rate = float(part.strip())
        except ValueError:
            raise click.BadParameter(
                f"not a request rate: {part.strip()!r} (a number > 0 or inf)") from None
        if not rate > 0:
            raise click.BadParameter(f"a request rate must be > 0 (or inf), got {part}")
        rates.append(rate)
    return rates


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise click.BadParameter("must be a JSON object")
    return value


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


SECTIONS = {
    "Options": datasets.DATASET_OPTIONS,
    "Server options": [
        click.Option(["--backend"], default="sglbatch", type=click.Choice(BACKENDS),
                     help="sglbatch/sglang: POST /generate (token ids); openai/vllm: "
                          "/v1/completions; openai-chat: /v1/chat/completions (default: "
                          "sglbatch)"),
        click.Option(["--base-url"], help="the server's URL (default: http://HOST:PORT)"),
        click.Option(["--host"], default="127.0.0.1", help="(default: 127.0.0.1)"),
        click.Option(["--port"], type=int, default=30000, help="(default: 30000)"),
        click.Option(["--model"], help="the model name sent to the OpenAI backends (default: "
                     "the first id of GET /v1/models); also the tokenizer when --tokenizer is "
                     "not given"),
        click.Option(["--tokenizer"], help="model path or alias whose tokenizer turns the "
                     "workload's token ids into text and counts tokens (default: --model, else "
                     "the server's model if it is a local path, else smollm2-135m-instruct)"),
        click.Option(["--api-key"], help="sent as `Authorization: Bearer KEY` (default: "
                     "$OPENAI_API_KEY)"),
    ],
    "Load options": [
        click.Option(["--request-rate"], type=parse_rates, default="inf",
                     metavar="RATE[,RATE...]",
                     help="requests per second, Poisson arrivals; inf sends all at once; a "
                          "comma-separated list runs one benchmark per rate (default: inf)"),
        click.Option(["--max-concurrency"], type=int,
                     help="at most this many requests in flight (default: no limit)"),
        click.Option(["--warmup-requests"], type=int, default=1,
                     help="requests sent (and not counted) before the first rate (default: 1)"),
        click.Option(["--disable-ignore-eos"], is_flag=True,
                     help="let outputs end at EOS instead of generating exactly the output "
                          "length"),
        click.Option(["--disable-stream"], is_flag=True,
                     help="non-streaming requests (TTFT is then the whole latency)"),
        click.Option(["--disable-flush-cache"], is_flag=True,
                     help="do not POST /flush_cache before each rate (sglbatch and SGLang "
                          "empty their prefix cache, so no rate reuses an earlier one's "
                          "prompts; other servers answer 404 and nothing happens)"),
        click.Option(["--extra-request-body"], type=_json_object, default="{}", metavar="JSON",
                     help="fields added to every request body (native backends: sampling "
                          "parameters go in sampling_params)"),
    ],
    "Output options": [
        click.Option(["--output-file"], type=click.Path(path_type=Path),
                     help="append one JSON summary line per rate here"),
        click.Option(["--output-details"], type=click.Path(path_type=Path),
                     help="write one JSON line per request here (rate, ttft, itl, latency, "
                          "prompt_len, output_len, error, ...)"),
        click.Option(["--plot"], type=click.Path(path_type=Path),
                     help="save a PNG: latency percentiles vs request rate and output tokens/s "
                          "over time"),
    ],
}


def resolve_base_url(args: SimpleNamespace) -> str:
    url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url must start with http:// or https://, got {url!r}")
    return url.removesuffix("/v1")


async def probe_server(backend: str, base_url: str, headers: dict[str, str],
                       model: str | None) -> tuple[str | None, str | None]:
    """Check the server answers; return (model name for the requests, a tokenizer hint: the
    served model's id or path). Raises ValueError naming --base-url when unreachable."""
    import aiohttp

    native = backend in NATIVE_BACKENDS
    path = "/get_model_info" if native else "/v1/models"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, \
                session.get(base_url + path, headers=headers) as response:
            status, body = response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError) as e:
        raise ValueError(f"cannot reach the server at --base-url {base_url} "
                         f"({type(e).__name__}: {e}); is it running?") from None
    try:
        data = json.loads(body) if status == 200 else None
    except ValueError:
        data = None
    if native:
        hint = data.get("model_path") if isinstance(data, dict) else None
        return model, model or hint
    if model is not None:
        return model, model
    models = data.get("data") if isinstance(data, dict) else None
    if not models:
        raise ValueError(f"GET {base_url}/v1/models answered {status} "
                         f"{body.strip()[:300]!r}; give --model (and --api-key if the server "
                         "wants one)")
    return models[0]["id"], models[0]["id"]


def load_tokenizer(explicit: str | None, hint: str | None, console: Any) -> Any:
    from sglbatch.engine.config import DEFAULT_MODEL
    from sglbatch.engine.model_source import resolve_model_path
    from sglbatch.engine.tokenizer import Tokenizer

    if explicit:
        return Tokenizer(resolve_model_path(explicit))
    if hint and hint != DEFAULT_MODEL:
        try:
            return Tokenizer(resolve_model_path(hint))
        except (ValueError, FileNotFoundError, OSError) as e:
            console.print(f"no tokenizer for {hint!r} here ({str(e)[:200]}); using "
                          f"{DEFAULT_MODEL}'s. Give --tokenizer for exact token counts.",
                          style="yellow", markup=False, highlight=False)
    return Tokenizer(resolve_model_path(DEFAULT_MODEL))


async def _flush_cache(client: Any) -> None:
    """Best effort: start each rate with an empty prefix cache (the prompts repeat). Any
    backend may be a server that has /flush_cache (an OpenAI-compatible sglbatch or SGLang)."""
    import aiohttp

    for _ in range(10):
        try:
            async with client.session.post(client.base_url + "/flush_cache",
                                           headers=client.headers) as response:
                if response.status != 400:  # 400: requests still finishing
                    return
        except (aiohttp.ClientError, TimeoutError):
            return
        await asyncio.sleep(0.2)


async def run_rate(client: Any, func: Any, inputs: list[Any], rate: float,
                   max_concurrency: int | None, seed: int, progress: Any = None
                   ) -> tuple[list[Any], float]:
    """Send `inputs` with exponential gaps of mean 1/rate (all at once for inf), at most
    `max_concurrency` in flight; return the outputs (in input order) and the wall time."""
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    task_id = progress.add_task(f"rate {rate_label(rate)}", total=len(inputs), speed="") \
        if progress is not None else None
    start = time.perf_counter()
    tokens = 0

    async def one(inp: Any) -> Any:
        nonlocal tokens
        if semaphore is None:
            sent = time.perf_counter()
            out = await func(client, inp)
        else:
            async with semaphore:
                sent = time.perf_counter()
                out = await func(client, inp)
        out.start_time = sent - start
        if progress is not None:
            tokens += out.output_len or 0  # servers without token counts: shown as 0
            speed = tokens / max(time.perf_counter() - start, 1e-9)
            progress.update(task_id, advance=1, speed=f"{speed:.0f} out tok/s")
        return out

    tasks = []
    for i, inp in enumerate(inputs):
        if i and not math.isinf(rate):
            await asyncio.sleep(rng.expovariate(rate))
        tasks.append(asyncio.create_task(one(inp)))
    outputs = await asyncio.gather(*tasks)
    return list(outputs), time.perf_counter() - start


async def _run_all(args: SimpleNamespace, base_url: str, headers: dict[str, str],
                   inputs: list[Any], on_rate: Any, console: Any) -> None:
    import aiohttp
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sglbatch.bench.serving_backends import REQUEST_FUNCS, Client
    from sglbatch.bench.serving_metrics import distinct_errors

    func = REQUEST_FUNCS[args.backend]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(session, base_url, headers)
        if args.warmup_requests > 0:
            warm = [replace(inputs[i % len(inputs)],
                            output_len=min(inputs[i % len(inputs)].output_len,
                                           _WARMUP_MAX_TOKENS))
                    for i in range(args.warmup_requests)]
            with console.status(f"warm-up: {len(warm)} request(s)..."):
                outs = await asyncio.gather(*(func(client, w) for w in warm))
            if not any(o.success for o in outs):
                console.print(f"warm-up failed: {distinct_errors(outs)[0]}", style="yellow",
                              markup=False, highlight=False)
        for rate in args.request_rate:
            if not args.disable_flush_cache:
                await _flush_cache(client)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("{task.fields[speed]}"), TimeElapsedColumn(),
                          console=console, transient=True) as progress:
                outputs, duration = await run_rate(client, func, inputs, rate,
                                                   args.max_concurrency, args.seed, progress)
            on_rate(rate, outputs, duration)


def run(args: SimpleNamespace) -> int:
    """The whole command; returns the exit status (1 when a rate completed no request)."""
    from rich.console import Console

    from sglbatch.bench.serving_backends import RequestInput
    from sglbatch.bench.serving_metrics import compute_metrics, distinct_errors

    console = Console()
    err = Console(stderr=True)
    if args.num_prompts < 1:
        raise ValueError("--num-prompts must be at least 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    base_url = resolve_base_url(args)
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model, hint = asyncio.run(probe_server(args.backend, base_url, headers, args.model))
    with err.status("loading the tokenizer and the workload..."):
        tokenizer = load_tokenizer(args.tokenizer, hint, err)
        requests = datasets.build_requests(args, tokenizer, tokenizer.hf.vocab_size)
    if not requests:
        raise ValueError("the workload has no requests")
    native = args.backend in NATIVE_BACKENDS
    inputs = [RequestInput(prompt=list(r.input_ids) if native else tokenizer.decode(r.input_ids),
                           prompt_len=len(r.input_ids), output_len=r.output_len,
                           ignore_eos=r.ignore_eos and not args.disable_ignore_eos,
                           stop=r.stop, model=model, stream=not args.disable_stream,
                           extra_body=dict(args.extra_request_body))
                 for r in requests]
    if args.output_details:
        args.output_details.write_text("")
    runs: list[tuple[float, dict[str, Any], list[Any]]] = []

    def on_rate(rate: float, outputs: list[Any], duration: float) -> None:
        for out in outputs:  # no count from the server: retokenize the text
            if out.success and out.output_len is None:
                out.output_len = len(tokenizer.hf.encode(out.generated_text,
                                                         add_special_tokens=False))
        record = {"backend": args.backend, "base_url": base_url, "model": model,
                  **datasets.dataset_record(args), "request_rate": rate_label(rate),
                  "max_concurrency": args.max_concurrency, "ignore_eos":
                  not args.disable_ignore_eos, "stream": not args.disable_stream,
                  **compute_metrics(outputs, duration), "errors": distinct_errors(outputs)}
        runs.append((rate, record, outputs))
        print_rate_table(console, record)
        if record["failed"]:
            err.print(f"{record['failed']} of {len(outputs)} request(s) failed: "
                      + "; ".join(record["errors"]), style="red", markup=False,
                      highlight=False)
        if args.output_file:
            with args.output_file.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if args.output_details:
            with args.output_details.open("a") as f:
                for i, out in enumerate(outputs):
                    f.write(json.dumps(detail_record(rate, i, out)) + "\n")

    asyncio.run(_run_all(args, base_url, headers, inputs, on_rate, err))
    if len(runs) > 1:
        print_summary_table(console, [record for _, record, _ in runs])
    if args.plot:
        from sglbatch.bench.plot import plot_serving

        plot_serving(args.plot, [(rate_label(rate), record, outputs)
                                 for rate, record, outputs in runs])
        err.print(f"plot written to {args.plot}")
    return 1 if any(record["completed"] == 0 for _, record, _ in runs) else 0


def detail_record(rate: float, index: int, out: Any) -> dict[str, Any]:
    return {"request_rate": rate_label(rate), "index": index, "success": out.success,
            "error": out.error or None, "start_time": out.start_time, "ttft": out.ttft,
            "itl": out.itl, "latency": out.latency, "prompt_len": out.prompt_len,
            "output_len": out.output_len or 0, "generated_text": out.generated_text}


_LATENCY_LABELS = {"e2e_latency": "E2E latency", "ttft": "TTFT", "tpot": "TPOT", "itl": "ITL"}


def print_rate_table(console: Any, record: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"bench serving: {record['backend']} at {record['request_rate']} "
                        "req/s")
    table.add_column("metric")
    table.add_column("value", justify="right")
    conc = record["max_concurrency"]
    rows = [("Backend", record["backend"]), ("Traffic request rate", record["request_rate"]),
            ("Max request concurrency", "unlimited" if conc is None else str(conc)),
            ("Successful requests", str(record["completed"])),
            ("Failed requests", str(record["failed"])),
            ("Benchmark duration (s)", f"{record['duration']:.2f}"),
            ("Total input tokens", str(record["total_input_tokens"])),
            ("Total generated tokens", str(record["total_output_tokens"])),
            ("Request throughput (req/s)", f"{record['request_throughput']:.2f}"),
            ("Input token throughput (tok/s)", f"{record['input_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{record['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{record['total_throughput']:.2f}"),
            ("Concurrency", f"{record['concurrency']:.2f}")]
    for name, value in rows:
        table.add_row(name, value)
    for key, label in _LATENCY_LABELS.items():
        table.add_section()
        for stat in ("mean", "median", "p90", "p99"):
            table.add_row(f"{stat.capitalize()} {label} (ms)", f"{record[f'{stat}_{key}_ms']:.2f}")
    console.print(table)


def print_summary_table(console: Any, records: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.table import Table

    table = Table(title=f"bench serving: {records[0]['backend']}, {len(records)} request rates",
                  caption="rate and req/s in requests/s, tok/s output tokens/s, conc. the "
                          "mean requests in flight, latencies in ms", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 0))
    columns = [("rate", "request_rate", "{}"), ("ok", "completed", "{}"),
               ("fail", "failed", "{}"), ("req/s", "request_throughput", "{:.2f}"),
               ("tok/s", "output_throughput", "{:.1f}"), ("conc.", "concurrency", "{:.1f}"),
               ("TTFT\nmean", "mean_ttft_ms", "{:.0f}"), ("TTFT\np99", "p99_ttft_ms", "{:.0f}"),
               ("TPOT\nmean", "mean_tpot_ms", "{:.1f}"), ("ITL\nmean", "mean_itl_ms", "{:.1f}"),
               ("E2E\nmean", "mean_e2e_latency_ms", "{:.0f}"),
               ("E2E\np99", "p99_e2e_latency_ms", "{:.0f}")]
    for label, _, _ in columns:
        table.add_column(label, justify="right", no_wrap=True)
    for record in records:
        table.add_row(*(fmt.format(record[key]) for _, key, fmt in columns))
    console.print(table)
