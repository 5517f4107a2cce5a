"""`sglbatch profile [--output-dir DIR] -- <subcommand> ...`: run any sglbatch subcommand
under `torch.profiler` (every thread, so the engine's own thread too; CUDA as well where
available) and write a Chrome/Perfetto trace JSON, then print its path and the ops with the
most self CPU time. The trace carries the `sglbatch.*` ranges (scheduler phases, forward
passes, each decoder layer) around the aten ops.

For `serve` the trace is written when the server stops (SIGINT/SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

SECTIONS = {"Options": [
    click.Option(["--output-dir"], type=click.Path(path_type=Path),
                 help="where the trace goes (default: $SGLANG_TORCH_PROFILER_DIR or "
                      "$SGLBATCH_TORCH_PROFILER_DIR, else the temp dir)"),
    click.Option(["--record-shapes"], is_flag=True, help="record input shapes of each op"),
    click.Option(["--with-stack"], is_flag=True,
                 help="record Python stacks (larger traces, more overhead)"),
    click.Option(["--top"], type=int, default=20,
                 help="ops shown in the summary table (default: 20)"),
    click.Argument(["command"], nargs=-1,
                   help="-- then the sglbatch subcommand and its arguments, e.g. -- bench "
                        "one-batch --batch-size 4 --input-len 128"),
]}


class _Terminated(BaseException):  # not caught by `except Exception` on the way out
    """SIGTERM, turned into an exception so the trace is still written."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def run(args: SimpleNamespace, parse: Callable[[list[str]], SimpleNamespace]) -> int:
    from rich.console import Console

    from sglbatch.engine.profiler import ProfileSession, print_top_ops

    argv = list(args.command)
    if not argv:
        raise ValueError("profile: give the subcommand to run after --, e.g. "
                         "`sglbatch profile -- bench one-batch --batch-size 4`")
    if argv[0] == "profile":
        raise ValueError("profile: cannot profile `profile` itself")
    sub_args = parse(argv)
    words = [w for w in argv[:2] if not w.startswith("-")]
    if words[1:] and words[0] != "bench":
        words = words[:1]
    session = ProfileSession(args.output_dir, name="-".join(["sglbatch", *words]),
                             record_shapes=args.record_shapes, with_stack=args.with_stack,
                             all_threads=True)
    console = Console()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    session.start()
    code = 1
    try:
        code = sub_args.func(sub_args)
    except KeyboardInterrupt:
        code = 130
    except _Terminated:
        code = 143
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
        path = session.stop()
        print_top_ops(console, session.top_ops(args.top),
                      f"sglbatch profile: {' '.join(words)}, top ops by self CPU time")
        # Plain print: a path wrapped over lines cannot be copied.
        print(f"trace written to {path} (open in https://ui.perfetto.dev or chrome://tracing)",
              flush=True)
    return code
