"""/metrics in Prometheus' text format, with SGLang's metric names (`sglang:` prefix), so
dashboards and scrapers written for SGLang work unchanged."""

from __future__ import annotations

from sglbatch.engine.stats import Histogram
from sglbatch.server.state import ServerState


def render_metrics(state: ServerState) -> str:
    labels = f'model_name="{state.model_name}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, value: float) -> None:
        lines.extend([f"# HELP sglang:{name} {help_text}", f"# TYPE sglang:{name} {kind}",
                      f"sglang:{name}{{{labels}}} {value}"])

    def histogram(name: str, help_text: str, h: Histogram) -> None:
        lines.extend([f"# HELP sglang:{name} {help_text}", f"# TYPE sglang:{name} histogram"])
        cumulative = 0
        for bound, count in zip([*map(str, h.buckets), "+Inf"], h.counts):
            cumulative += count
            lines.append(f'sglang:{name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        lines.append(f"sglang:{name}_sum{{{labels}}} {h.total}")
        lines.append(f"sglang:{name}_count{{{labels}}} {h.count}")

    engine = state.engine
    if engine is None:
        return f"# sglbatch: embedding server for {state.model_name}; no generation metrics\n"
    stats = engine.stats
    with stats.lock:
        metric("prompt_tokens_total", "counter", "Number of prefill tokens processed.",
               stats.prompt_tokens)
        metric("generation_tokens_total", "counter", "Number of generation tokens processed.",
               stats.generation_tokens)
        metric("cached_tokens_total", "counter", "Number of prompt tokens served from the "
               "prefix cache.", stats.cached_tokens)
        metric("num_requests_total", "counter", "Number of finished requests.", stats.requests)
        metric("num_aborted_requests_total", "counter", "Number of aborted requests.",
               stats.aborted_requests)
        hit_rate = stats.cached_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0
        histogram("time_to_first_token_seconds", "Histogram of time to first token in "
                  "seconds.", stats.time_to_first_token)
        histogram("time_per_output_token_seconds", "Histogram of time per output token in "
                  "seconds.", stats.time_per_output_token)
        histogram("e2e_request_latency_seconds", "Histogram of End-to-end request latency "
                  "in seconds", stats.e2e_latency)
    # One gauge per data-parallel replica (labelled dp_rank), or the engine's own.
    loads = engine.loads()
    per_replica = len(loads) > 1

    def gauge(name: str, help_text: str, key: str) -> None:
        lines.extend([f"# HELP sglang:{name} {help_text}", f"# TYPE sglang:{name} gauge"])
        for load in loads:
            where = f'{labels},dp_rank="{load["dp_rank"]}"' if per_replica else labels
            lines.append(f"sglang:{name}{{{where}}} {round(load[key], 6)}")

    gauge("num_running_reqs", "The number of running requests.", "num_running_reqs")
    gauge("num_queue_reqs", "The number of requests in the waiting queue.", "num_queue_reqs")
    gauge("num_used_tokens", "The number of used KV slots.", "num_used_tokens")
    gauge("token_usage", "The token usage (used KV slots / pool size).", "token_usage")
    metric("cache_hit_rate", "gauge", "The prefix cache hit rate (cached / prompt tokens).",
           round(hit_rate, 6))
    return "\n".join(lines) + "\n"
