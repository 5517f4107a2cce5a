"""Benchmark workloads: lists of (prompt token ids, output length)."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    input_ids: list[int]
    output_len: int


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
