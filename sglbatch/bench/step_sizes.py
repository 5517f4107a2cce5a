"""Where a run's engine time went, by step: prefill, then decode (and speculative decoding's
verify steps) by batch size. Read from the engine's step tally (`EngineStats.on_step`)
before and after the run, so it costs the run nothing; a long tail of small decode batches,
each reading every weight for a few tokens, shows here."""

from __future__ import annotations

from typing import Any

from sglbatch.engine.stats import EngineStats


def engine_stats(engine: Any) -> EngineStats:
    """The statistics of every replica of `engine` (one, unless data-parallel), summed."""
    return EngineStats.merged(list(engine.replica_stats().values()))


def _sizes(bucket: int) -> str:
    return str(bucket) if bucket <= 2 else f"{bucket // 2 + 1}-{bucket}"


def step_rows(before: EngineStats, after: EngineStats) -> list[dict[str, Any]]:
    """The steps taken between two snapshots: one row for all prefill (extend) steps, then
    one per decode batch-size bucket (1, 2, 3-4, 5-8, ...), smallest first, then the same
    for verify steps (their tokens: those they gave, accepted drafts included)."""
    counts = after.step_counts - before.step_counts
    seconds = after.step_seconds - before.step_seconds
    tokens = after.step_tokens - before.step_tokens
    rows = []
    extend = [key for key in counts if key[0] == "extend"]
    if extend:
        rows.append({"mode": "extend", "batch_sizes": "all",
                     "steps": sum(counts[k] for k in extend),
                     "seconds": sum(seconds[k] for k in extend),
                     "tokens": sum(tokens[k] for k in extend)})
    for mode in ("decode", "verify"):
        for key in sorted(k for k in counts if k[0] == mode):
            rows.append({"mode": mode, "batch_sizes": _sizes(key[1]), "steps": counts[key],
                         "seconds": seconds[key], "tokens": tokens[key]})
    return rows


def print_step_table(console: Any, rows: list[dict[str, Any]], duration: float) -> None:
    from rich.table import Table

    total = sum(row["seconds"] for row in rows)
    table = Table(title="engine steps by batch size (share: of the run's time)",
                  caption=f"the steps took {total:.1f} s of the run's {duration:.1f} s; the "
                          "rest went between steps")
    for column in ("step", "steps", "seconds", "share", "ms/step", "tok/s"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for row in rows:
        label = ("prefill" if row["mode"] == "extend"
                 else f"{row['mode']}, batch {row['batch_sizes']}")
        table.add_row(label, str(row["steps"]), f"{row['seconds']:.1f}",
                      f"{row['seconds'] / duration:.1%}",
                      f"{row['seconds'] / row['steps'] * 1e3:.1f}",
                      f"{row['tokens'] / row['seconds']:.0f}" if row["seconds"] > 0 else "-")
    console.print(table)
