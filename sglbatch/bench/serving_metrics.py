"""`bench serving`: what one request measured, and the run's metrics from those records
(as SGLang's bench_serving reports them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestOutput:
    """One request as the client saw it. Times in seconds; `start_time` from the start of
    its rate's run. `output_len` is None until known (the server's usage/meta_info, else the
    output text retokenized)."""

    success: bool = False
    error: str = ""
    ttft: float = 0.0  # request sent -> first chunk carrying tokens
    itl: list[float] = field(default_factory=list)  # gaps between chunks carrying tokens
    latency: float = 0.0  # request sent -> stream ended
    prompt_len: int = 0
    output_len: int | None = None
    generated_text: str = ""
    start_time: float = 0.0


# The latency metrics: name -> (table label, per-request values in seconds).
LATENCIES = ("ttft", "tpot", "itl", "e2e_latency")
STATS = ("mean", "median", "std", "p90", "p99")


def tpot(out: RequestOutput) -> float | None:
    """Time per output token after the first; None with fewer than two tokens."""
    if not out.output_len or out.output_len < 2:
        return None
    return (out.latency - out.ttft) / (out.output_len - 1)


def _stats(name: str, seconds: list[float]) -> dict[str, float]:
    import numpy as np

    if not seconds:  # as SGLang: an empty series reports zeros
        return {f"{s}_{name}_ms": 0.0 for s in STATS}
    ms = np.asarray(seconds, dtype=np.float64) * 1000
    return {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(ms.std()), f"p90_{name}_ms": float(np.percentile(ms, 90)),
            f"p99_{name}_ms": float(np.percentile(ms, 99))}


def compute_metrics(outputs: list[RequestOutput], duration: float) -> dict[str, Any]:
    """The run's metrics: counts, throughputs over `duration` (the run's wall time, first
    request sent to last response ended), concurrency (the sum of the completed requests'
    latencies over the duration: the mean number in flight) and latency statistics in ms
    over the completed requests (ITL over every gap of every completed request)."""
    done = [o for o in outputs if o.success]
    input_tokens = sum(o.prompt_len for o in done)
    output_tokens = sum(o.output_len or 0 for o in done)
    per = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    metrics: dict[str, Any] = {
        "duration": duration,
        "completed": len(done),
        "failed": len(outputs) - len(done),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": per(len(done)),
        "input_throughput": per(input_tokens),
        "output_throughput": per(output_tokens),
        "total_throughput": per(input_tokens + output_tokens),
        "concurrency": per(sum(o.latency for o in done)),
    }
    series = {
        "ttft": [o.ttft for o in done],
        "tpot": [t for t in map(tpot, done) if t is not None],
        "itl": [gap for o in done for gap in o.itl],
        "e2e_latency": [o.latency for o in done],
    }
    for name in LATENCIES:
        metrics.update(_stats(name, series[name]))
    return metrics


def distinct_errors(outputs: list[RequestOutput], limit: int = 5) -> list[str]:
    """The first `limit` different error messages, in order of appearance."""
    seen: dict[str, None] = {}
    for o in outputs:
        if not o.success and o.error not in seen:
            seen[o.error] = None
            if len(seen) == limit:
                break
    return list(seen)


def token_times(out: RequestOutput) -> list[float]:
    """When each output token of a completed request arrived (seconds from the run's start):
    the first at TTFT, then one per ITL gap; tokens no chunk boundary accounts for (several
    in one chunk) count at the end of the request."""
    if not out.success or not out.output_len:
        return []
    t = out.start_time + out.ttft
    times = [t]
    for gap in out.itl:
        t += gap
        times.append(t)
    times = times[:out.output_len]
    times += [out.start_time + out.latency] * (out.output_len - len(times))
    return times
