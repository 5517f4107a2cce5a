"""`bench serving --plot`: one PNG with latency percentiles against the request rate and the
output token throughput over time, per rate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sglbatch.bench.serving_metrics import RequestOutput, token_times

_PANELS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("e2e_latency", "E2E latency"))
_PERCENTILES = (("median", "p50"), ("p90", "p90"), ("p99", "p99"))


def throughput_over_time(outputs: list[RequestOutput], bucket_s: float
                         ) -> tuple[list[float], list[float]]:
    """Output tokens/s in consecutive `bucket_s` buckets from the run's start: (bucket
    midpoints, rates)."""
    times = [t for out in outputs for t in token_times(out)]
    if not times:
        return [], []
    n = int(max(times) // bucket_s) + 1
    counts = [0] * n
    for t in times:
        counts[min(int(t // bucket_s), n - 1)] += 1
    return [(i + 0.5) * bucket_s for i in range(n)], [c / bucket_s for c in counts]


def plot_serving(path: Path, runs: list[tuple[str, dict[str, Any], list[RequestOutput]]]
                 ) -> None:
    """`runs`: (rate label, metrics record, request outputs) per rate, in the order run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    labels = [label for label, _, _ in runs]
    x = list(range(len(runs)))
    for ax, (key, title) in zip(axes.flat, _PANELS):
        for stat, name in _PERCENTILES:
            ax.plot(x, [record[f"{stat}_{key}_ms"] for _, record, _ in runs], marker="o",
                    label=name)
        ax.set_xticks(x, labels)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title} percentiles")
        ax.grid(alpha=0.3)
        ax.legend()
    ax = axes.flat[3]
    longest = max((record["duration"] for _, record, _ in runs), default=0.0)
    bucket = 1.0 if longest >= 20 else max(longest / 20, 0.01)
    for label, _, outputs in runs:
        mids, rates = throughput_over_time(outputs, bucket)
        ax.plot(mids, rates, label=f"rate {label}")
    ax.set_xlabel("seconds since the rate's first request")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"output throughput over time ({bucket:.2g} s buckets)")
    ax.grid(alpha=0.3)
    ax.legend()
    backend = runs[0][1]["backend"] if runs else ""
    fig.suptitle(f"bench serving: {backend}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
