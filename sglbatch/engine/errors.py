"""The error the engine raises to callers whose requests a failed step took down."""

from __future__ import annotations

ENGINE_ERROR_STATUS = 500


class EngineError(RuntimeError):
    """A step of the engine failed (or the engine stopped after repeated failures): the
    requests it touched failed with it. Other requests are unaffected. Servers answer 500."""
