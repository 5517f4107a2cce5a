"""What a running job shows: a live progress bar, and a summary table at the end."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


@dataclass
class JobStats:
    rows: int = 0  # records written by this run, errors included
    errors: int = 0
    skipped: int = 0  # finished by an earlier run (resume)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    # Data parallel: what each replica did for this job, by rank (rows = requests).
    replicas: dict[int, dict[str, int]] = field(default_factory=dict)

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.started

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "errors": self.errors, "skipped": self.skipped,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "cached_tokens": self.cached_tokens, "cache_hit_rate": self.cache_hit_rate,
                "wall_seconds": self.wall,
                "output_tokens_per_s": self.output_tokens / self.wall if self.wall else 0.0,
                **({"replicas": self.replicas} if self.replicas else {})}


class JobProgress:
    """rows done/total, output tokens/s, cache hit rate, errors and ETA, updated per row."""

    def __init__(self, console: Console, name: str, total: int | None, stats: JobStats):
        self.stats = stats
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TaskProgressColumn(), TextColumn("{task.fields[speed]}"),
            TextColumn("cache {task.fields[cache]}"), TextColumn("{task.fields[errors]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)
        self._task = self._progress.add_task(name, total=total, speed="", cache="-", errors="")

    def __enter__(self) -> JobProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def advance(self, rows: int = 1) -> None:
        s = self.stats
        self._progress.update(
            self._task, advance=rows,
            speed=f"{s.output_tokens / s.wall:,.0f} tok/s" if s.wall > 0 else "",
            cache=f"{s.cache_hit_rate:.0%}",
            errors=f"[red]{s.errors} errors" if s.errors else "")


def summary_table(name: str, stats: JobStats, output: str) -> Table:
    table = Table(title=f"job {name}: {output}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    s = stats.as_dict()
    rows = [("rows written", f"{s['rows']:,}"), ("errors", f"{s['errors']:,}"),
            ("skipped (done earlier)", f"{s['skipped']:,}"),
            ("prompt tokens", f"{s['prompt_tokens']:,}"),
            ("cached prompt tokens", f"{s['cached_tokens']:,} ({s['cache_hit_rate']:.1%})"),
            ("output tokens", f"{s['output_tokens']:,}"),
            ("wall time", f"{s['wall_seconds']:.1f} s"),
            ("throughput", f"{s['output_tokens_per_s']:,.1f} output tok/s, "
                           f"{s['rows'] / s['wall_seconds'] if s['wall_seconds'] else 0:,.2f} rows/s")]
    for rank, r in sorted(stats.replicas.items()):
        hit = r["cached_tokens"] / r["prompt_tokens"] if r["prompt_tokens"] else 0.0
        rows.append((f"replica {rank}", f"{r['rows']:,} rows, {r['output_tokens']:,} output "
                                        f"tokens, {hit:.1%} cached"))
    for key, value in rows:
        table.add_row(key, value)
    return table
