"""Request statistics the engine keeps for /metrics (token counters and latency histograms)
and a tally of its steps by batch size for `bench offline`; updated on the engine thread,
read (racily but harmlessly) by the server."""

from __future__ import annotations

import bisect
import copy
import dataclasses
import threading
from collections import Counter
from dataclasses import dataclass, field

# SGLang's default buckets for its latency histograms (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 15.0, 20.0, 25.0, 30.0)
TPOT_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 20, 30, 40, 50, 60, 90, 120, 150, 180, 240,
               300, 600)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; +1 for +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


def batch_size_bucket(n: int) -> int:
    """The power of two at or above n: steps are tallied for batch sizes 1, 2, 3-4, 5-8..."""
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    aborted_requests: int = 0
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    time_per_output_token: Histogram = field(default_factory=lambda: Histogram(TPOT_BUCKETS))
    e2e_latency: Histogram = field(default_factory=lambda: Histogram(E2E_BUCKETS))
    # Engine steps by (mode, batch-size bucket): how many, their seconds, and the tokens they
    # computed; a run's time split by batch size shows, e.g., a tail of small decode batches.
    step_counts: Counter = field(default_factory=Counter)
    step_seconds: Counter = field(default_factory=Counter)
    step_tokens: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def on_step(self, mode: str, batch_size: int, tokens: int, seconds: float) -> None:
        key = (mode, batch_size_bucket(batch_size))
        with self.lock:
            self.step_counts[key] += 1
            self.step_seconds[key] += seconds
            self.step_tokens[key] += tokens

    def on_first_token(self, seconds: float) -> None:
        with self.lock:
            self.time_to_first_token.observe(seconds)

    def on_finish(self, prompt_tokens: int, cached_tokens: int, output_tokens: int,
                  e2e: float, ttft: float | None, aborted: bool) -> None:
        with self.lock:
            self.requests += 1
            self.aborted_requests += aborted
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            self.generation_tokens += output_tokens
            self.e2e_latency.observe(e2e)
            if ttft is not None and output_tokens > 1:
                self.time_per_output_token.observe((e2e - ttft) / (output_tokens - 1))

    def snapshot(self) -> EngineStats:
        """A consistent copy (picklable: a data-parallel replica sends it to the front)."""
        with self.lock:
            return EngineStats(**{f.name: copy.deepcopy(getattr(self, f.name))
                                  for f in dataclasses.fields(self) if f.name != "lock"})

    @classmethod
    def merged(cls, parts: list[EngineStats]) -> EngineStats:
        """The sum of several engines' statistics (data-parallel replicas)."""
        total = cls()
        for part in parts:
            for f in dataclasses.fields(cls):
                mine, theirs = getattr(total, f.name), getattr(part, f.name)
                if isinstance(mine, Histogram):
                    mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts)]
                    mine.total += theirs.total
                    mine.count += theirs.count
                elif f.name != "lock":
                    setattr(total, f.name, mine + theirs)
        return total

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, lock=threading.Lock())
