"""The error the engine raises to callers whose requests a failed step took down."""

from __future__ import annotations

from typing import Any

ENGINE_ERROR_STATUS = 500


class EngineError(RuntimeError):
    """A step of the engine failed (or the engine stopped after repeated failures): the
    requests it touched failed with it. Other requests are unaffected. Servers answer 500."""


def engine_error_in(output: dict[str, Any]) -> str | None:
    """The message of an output that an engine failure finished, else None."""
    reason = output["meta_info"]["finish_reason"]
    if reason and reason.get("type") == "abort" and \
            (reason.get("status_code") or 0) >= ENGINE_ERROR_STATUS:
        return reason.get("message") or "engine error"
    return None
