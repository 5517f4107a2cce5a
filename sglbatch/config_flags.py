"""Command-line flags generated from the config dataclasses (EngineConfig, ServerArgs).

Defaults and help are written once, in each dataclass's fields; the CLI adds them to its
parsers, and `Runtime` turns keyword arguments into the same flags for a child server.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_TYPES = {"int": int, "float": float, "int | None": int, "float | None": float}


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """One flag per field of `cls`: bools are switches, the rest typed as annotated."""
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        if f.type == "bool":
            group.add_argument(flag_of(f.name), action="store_true", dest=f.name,
                               help=help_text)
            continue
        default = f"(default: {f.default})" if f.default is not None else ""
        group.add_argument(flag_of(f.name), type=_TYPES.get(str(f.type), str),
                           default=f.default, dest=f.name,
                           help=" ".join(p for p in (help_text, default) if p))


def dataclass_kwargs(args: argparse.Namespace, cls: type) -> dict[str, Any]:
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
