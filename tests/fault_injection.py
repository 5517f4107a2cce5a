"""Failures injected into the engine's forward pass, to test that a failed step fails the
requests it touched and nothing else: in process (`fail_forward`), or in a real
`sglbatch serve` subprocess (`python -m tests.fault_injection serve ...` from the repo root:
requests whose rid starts with POISON fail in the forward pass)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

POISON = "poison"
MESSAGE = "injected forward failure"


def has_poisoned_request(batch: Any) -> bool:
    return any(req.rid.startswith(POISON) for req in batch.reqs)


def failing(forward: Callable[..., Any], when: Callable[[Any], bool]) -> Callable[..., Any]:
    """`forward` (a method or a bound method: the batch comes last), raising
    RuntimeError(MESSAGE) for the batches `when` picks."""

    def forward_or_fail(*args: Any) -> Any:
        if when(args[-1]):
            raise RuntimeError(MESSAGE)
        return forward(*args)

    return forward_or_fail


def fail_forward(engine: Any, when: Callable[[Any], bool]) -> None:
    runner = engine.model_runner
    runner.launch = failing(runner.launch, when)


class FirstCalls:
    """A `when` that picks the first `n` batches."""

    def __init__(self, n: int = 1):
        self.left = n

    def __call__(self, batch: Any) -> bool:
        self.left -= 1
        return self.left >= 0


if __name__ == "__main__":
    from sglbatch.cli import main
    from sglbatch.engine.model_runner import ModelRunner

    ModelRunner.launch = failing(ModelRunner.launch,
                                             has_poisoned_request)
    sys.exit(main())
