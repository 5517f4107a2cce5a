"""Turn one input row into an engine request: the prompt or chat messages, and its sampling
parameters. A row that cannot be rendered raises RowError, which becomes its error record."""

from __future__ import annotations

import json
import string
from typing import Any

from sglbatch.jobs.reader import Row
from sglbatch.jobs.spec import JOB_N_MESSAGE, JobSpec


class RowError(ValueError):
    """This row cannot run; the message goes into its output record as `error`."""


class _StrictFormatter(string.Formatter):
    """str.format over a row, naming the missing column and the ones that exist."""

    def __init__(self, row: dict[str, Any], where: str):
        self.row, self.where = row, where

    def get_value(self, key: Any, args: Any, kwargs: Any) -> Any:
        if isinstance(key, int):
            raise RowError(f"{self.where}: positional field {{{key}}}; use a column name")
        if key not in self.row:
            raise RowError(f"{self.where}: the row has no column {key!r} "
                           f"(columns: {', '.join(map(str, self.row)) or 'none'})")
        return self.row[key]


def _format(template: str, row: dict[str, Any], where: str) -> str:
    try:
        return _StrictFormatter(row, where).format(template)
    except RowError:
        raise
    except (ValueError, IndexError, AttributeError, KeyError, TypeError) as e:
        raise RowError(f"{where}: cannot format the template: {e}") from e


def render_messages(job: JobSpec, row: dict[str, Any]) -> list[dict[str, Any]]:
    if isinstance(job.messages, str):  # a column holding the conversation
        value = row.get(job.messages)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise RowError(f"messages: column {job.messages!r} is not JSON: {e}") from e
        if not isinstance(value, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in value):
            raise RowError(f"messages: column {job.messages!r} must hold a list of "
                           "{role, content} objects")
        return value
    return [{"role": m["role"], "content": _format(m["content"], row, f"messages[{i}].content")}
            for i, m in enumerate(job.messages)]


def render_sampling(job: JobSpec, row: dict[str, Any]) -> dict[str, Any]:
    params = dict(job.sampling)
    if job.sampling_column is None:
        return params
    overrides = row.get(job.sampling_column)
    if isinstance(overrides, str) and not overrides.strip():
        overrides = None  # an empty CSV cell: no overrides
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as e:
            raise RowError(f"sampling_column {job.sampling_column!r} is not JSON: {e}") from e
    if overrides is None:
        return params
    if not isinstance(overrides, dict):
        raise RowError(f"sampling_column {job.sampling_column!r} must hold an object of "
                       f"sampling parameters, got {type(overrides).__name__}")
    params = {**params, **overrides}
    if params.get("n", 1) != 1:
        raise RowError(f"sampling_column {job.sampling_column!r}: {JOB_N_MESSAGE}")
    return params


def render_prompt(job: JobSpec, row: dict[str, Any]) -> str:
    return _format(job.prompt, row, "prompt")


def render_input(job: JobSpec, row: Row) -> str | list[dict[str, Any]]:
    """The row's prompt text (a `prompt` job) or chat messages (a `messages` job)."""
    if row.error is not None:  # the reader could not read it
        raise RowError(row.error)
    if job.prompt is not None:
        return render_prompt(job, row.data)
    return render_messages(job, row.data)
