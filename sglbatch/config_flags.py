"""Command-line flags generated from the config dataclasses (EngineConfig, ServerArgs).

Defaults and help are written once, in each dataclass's fields; the CLI adds them to its
commands as click options, and `Runtime` turns keyword arguments into the same flags for a
child server.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import click

_TYPES = {"int": int, "float": float, "int | None": int, "float | None": float}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def dataclass_options(cls: type) -> list[click.Option]:
    """One flag per field of `cls`: bools are switches, the rest typed as annotated."""
    options = []
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            options.append(click.Option([flag_of(f.name), f.name], is_flag=True, help=help_text))
            continue
        default = f"(default: {f.default})" if f.default is not None else ""
        options.append(click.Option([flag_of(f.name), f.name], type=_TYPES.get(str(f.type), str),
                                    default=f.default,
                                    help=" ".join(p for p in (help_text, default) if p)))
    return options


def dataclass_kwargs(args: SimpleNamespace, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}


def to_flags(values: dict[str, Any], *classes: type) -> tuple[list[str], list[str]]:
    """`values` (field name -> value) as the flags of `classes`' fields, and the names no
    class has. None means the default (no flag); a bool field takes only a bool."""
    fields = {f.name: f for cls in classes for f in dataclasses.fields(cls)}
    flags: list[str] = []
    unknown = []
    for name, value in values.items():
        f = fields.get(name)
        if f is None:
            unknown.append(name)
        elif value is None:
            continue
        elif f.type == "bool":
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
            flags += [flag_of(name)] if value else []
        else:
            flags += [flag_of(name), str(value).lower() if isinstance(value, bool) else str(value)]
    return flags, unknown
