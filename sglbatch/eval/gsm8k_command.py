"""`sglbatch eval gsm8k`: k-shot GSM8K accuracy, as SGLang's GSM8K benchmark measures it,
on the in-process engine, a server (`--base-url`), or transformers `generate`."""

from __future__ import annotations

import datetime
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import click

from sglbatch.bench.gsm8k import (
    INVALID,
    STOP,
    answer_value,
    few_shot_prefix,
    load_gsm8k,
    question_prompt,
)
from sglbatch.eval.completers import Completion

if TYPE_CHECKING:
    from typing_extensions import Self

SECTIONS = {"Options": [
    click.Option(["--backend"], default="sglbatch", type=click.Choice(["sglbatch", "transformers"]),
                 help="sglbatch: the in-process engine, or the server at --base-url; "
                      "transformers: greedy transformers `generate` on the same prompt tokens, "
                      "--parallel prompts per batch (default: sglbatch)"),
    click.Option(["--base-url"], help="a server speaking SGLang's native API (sglbatch serve, "
                 "SGLang), e.g. http://127.0.0.1:30000; without it the model runs in process"),
    click.Option(["--api-key"], envvar="SGLANG_API_KEY",
                 help="the server's key (default: $SGLANG_API_KEY)"),
    click.Option(["--num-questions"], type=int, default=200,
                 help="the first N test questions; 0 = all 1,319 (default: 200)"),
    click.Option(["--num-shots"], type=int, default=5, help="(default: 5)"),
    click.Option(["--shots-from"], default="train", type=click.Choice(["train", "test"]),
                 help="where the worked examples come from. test reproduces SGLang's benchmark "
                      "exactly (its shots are the first test questions, which are then also "
                      "asked) (default: train)"),
    click.Option(["--parallel"], type=int, default=64,
                 help="questions in flight at once (default: 64)"),
    click.Option(["--max-new-tokens"], type=int, default=512,
                 help="per answer; answers also stop at \"Question\" (default: 512)"),
    click.Option(["--data-path"], help="folder with train.jsonl and test.jsonl (default: "
                 "downloaded once from the public URL into the cache)"),
    click.Option(["--output-file"], type=click.Path(path_type=Path),
                 default=Path("gsm8k_results.jsonl"),
                 help="append a result line here (default: gsm8k_results.jsonl)"),
    click.Option(["--answers-file"], type=click.Path(path_type=Path),
                 help="each question's prompt, answer and score, one JSON line each (default: "
                      "the output file's name + .answers.jsonl)"),
]}


def build_questions(args: SimpleNamespace) -> tuple[str, list[dict[str, Any]]]:
    """The shared k-shot prefix, and the test questions with their labels."""
    if args.num_shots < 0 or args.num_questions < 0 or args.parallel < 1:
        raise ValueError("--num-shots and --num-questions must be >= 0 and --parallel >= 1")
    test = load_gsm8k("test", args.data_path)
    shots = test if args.shots_from == "test" else load_gsm8k("train", args.data_path)
    rows = test[:args.num_questions] if args.num_questions else test
    return few_shot_prefix(shots, args.num_shots), [
        {"question": row["question"], "label": answer_value(row["answer"])} for row in rows]


def run(args: SimpleNamespace, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from rich.console import Console

    console = Console()
    prefix, questions = build_questions(args)
    prompts = [prefix + question_prompt(q["question"]) for q in questions]
    with _Completer(args, engine_kwargs, console) as completer:
        completions, latency = _complete_all(completer, prompts, questions, console)
    record, answers = _score(questions, prompts, completions, latency)
    answers_file = args.answers_file or args.output_file.with_name(
        args.output_file.name.removesuffix(".jsonl") + ".answers.jsonl")
    record = {"task": "gsm8k", **completer.describe(), **record,
              "num_shots": args.num_shots, "shots_from": args.shots_from,
              "max_new_tokens": args.max_new_tokens, "parallel": args.parallel,
              "answers_file": str(answers_file),
              "time": datetime.datetime.now().isoformat(timespec="seconds")}
    answers_file.parent.mkdir(parents=True, exist_ok=True)
    answers_file.write_text("".join(json.dumps(a) + "\n" for a in answers))
    args.output_file.parent.mkdir(parents=True, exist_ok=True)
    with args.output_file.open("a") as f:
        f.write(json.dumps(record) + "\n")
    _print_table(console, record, args.output_file)
    return record


class _Completer:
    """Loads what `--backend`/`--base-url` name and completes prompts with it."""

    def __init__(self, args: SimpleNamespace, engine_kwargs: dict[str, Any], console: Any):
        self.args = args
        self.engine_kwargs = engine_kwargs
        self.console = console
        self.engine = None

    def __enter__(self) -> Self:
        from sglbatch.engine.config import EngineConfig
        from sglbatch.engine.model_source import resolve_model_path

        args = self.args
        config = EngineConfig(**self.engine_kwargs)
        self.dtype = config.resolve_dtype()
        if args.backend == "transformers":
            if args.base_url:
                raise ValueError("--backend transformers runs the model in process; "
                                 "drop --base-url")
            from sglbatch.bench.transformers_baseline import TransformersGenerator
            from sglbatch.engine.tokenizer import Tokenizer

            model_dir = resolve_model_path(config.model_path)
            self.tokenizer = Tokenizer(model_dir)
            with self.console.status("loading the model in transformers..."):
                self.transformers = TransformersGenerator(model_dir, self.dtype, config.device)
        elif args.base_url:
            import httpx

            from sglbatch.lang.backend.runtime_endpoint import RuntimeEndpoint

            try:
                self.backend = RuntimeEndpoint(args.base_url, api_key=args.api_key)
            except (httpx.HTTPError, RuntimeError) as e:  # unreachable, or not 200 (a key?)
                raise ValueError(f"--base-url {args.base_url}: GET /get_model_info failed "
                                 f"({type(e).__name__}: {e}); is an sglbatch or SGLang "
                                 "server running there (with --api-key if it wants one)?"
                                 ) from None
        else:
            from sglbatch.engine.engine import Engine
            from sglbatch.lang.backend.engine import EngineBackend

            with self.console.status("loading the model..."):
                self.engine = Engine(**self.engine_kwargs)
            self.backend = EngineBackend(self.engine)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    def complete(self, prompts: list[str]):
        from sglbatch.eval.completers import complete_with_program, complete_with_transformers

        args = self.args
        if args.backend == "transformers":
            ids = [self.tokenizer.encode(p) for p in prompts]
            return complete_with_transformers(self.transformers, ids,
                                              args.max_new_tokens, STOP, args.parallel)
        return complete_with_program(self.backend, prompts, args.max_new_tokens, STOP,
                                     args.parallel)

    def describe(self) -> dict[str, Any]:
        if self.args.base_url:
            return {"backend": "sglbatch", "base_url": self.args.base_url,
                    "model": self.backend.get_model_name()}
        return {"backend": self.args.backend, "model": self.engine_kwargs["model_path"],
                "dtype": str(self.dtype).removeprefix("torch.")}


def _complete_all(completer: _Completer, prompts: list[str], questions: list[dict[str, Any]],
                  console: Any) -> tuple[list[Completion], float]:
    """Every prompt's completion, with a live bar (tokens/s, running accuracy); latency is
    the generation's wall time, model loading excluded."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    completions: list[Completion | None] = [None] * len(prompts)
    tokens = correct = 0
    progress = Progress(TextColumn("[bold]gsm8k"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[speed]}"), TextColumn("{task.fields[acc]}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    task = progress.add_task("gsm8k", total=len(prompts), speed="", acc="")
    with progress:
        stream = completer.complete(prompts)
        start = time.perf_counter()
        for done, (i, completion) in enumerate(stream, start=1):
            completions[i] = completion
            tokens += completion.completion_tokens
            correct += answer_value(completion.text) == questions[i]["label"]
            elapsed = time.perf_counter() - start
            progress.update(task, advance=1, speed=f"{tokens / elapsed:.0f} tok/s",
                            acc=f"acc {correct / done:.3f}")
        latency = time.perf_counter() - start
    return completions, latency  # type: ignore[return-value]


def _score(questions: list[dict[str, Any]], prompts: list[str], completions: list[Completion],
           latency: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    answers = []
    for i, (q, prompt, c) in enumerate(zip(questions, prompts, completions)):
        pred = answer_value(c.text)
        answers.append({"index": i, "question": q["question"], "prompt": prompt,
                        "completion": c.text, "completion_tokens": c.completion_tokens,
                        "pred": pred, "label": q["label"], "correct": pred == q["label"]})
    n = len(answers)
    output_tokens = sum(c.completion_tokens for c in completions)
    return {"num_questions": n,
            "accuracy": sum(a["correct"] for a in answers) / n,
            "invalid": sum(a["pred"] is INVALID for a in answers) / n,
            "latency": latency,
            "num_output_tokens": output_tokens,
            "output_throughput": output_tokens / latency}, answers


def _print_table(console: Any, record: dict[str, Any], output_file: Path) -> None:
    from rich.table import Table

    table = Table(title=f"GSM8K {record['num_shots']}-shot, {record['backend']} "
                        f"({record['model']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("questions", str(record["num_questions"]))
    table.add_row("accuracy", f"{record['accuracy']:.3f}")
    table.add_row("invalid", f"{record['invalid']:.3f}")
    table.add_row("latency", f"{record['latency']:.2f} s")
    table.add_row("output throughput", f"{record['output_throughput']:.1f} tok/s")
    console.print(table)
    console.print(f"[dim]result appended to {output_file}; answers in {record['answers_file']}")
