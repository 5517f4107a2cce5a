"""What callers' threads send the engine thread: one small type per command, each carrying
its own payload (and, where an answer is owed, the function that delivers it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sglbatch.engine.output_processor import TrackedRequest
    from sglbatch.engine.profiler import ProfileSession

Reply = Callable[[tuple[bool, Any]], None]  # (ok, value or the exception)


@dataclass(frozen=True)
class AddRequests:
    """A prompt's samples (n of them), the first one leading."""

    group: list[TrackedRequest]


@dataclass(frozen=True)
class Abort:
    rid: str


@dataclass(frozen=True)
class FlushCache:
    reply: Callable[[bool], None]


@dataclass(frozen=True)
class StartProfile:
    session: ProfileSession
    reply: Reply


@dataclass(frozen=True)
class StopProfile:
    reply: Reply


@dataclass(frozen=True)
class Stop:
    pass


Message = AddRequests | Abort | FlushCache | StartProfile | StopProfile | Stop
