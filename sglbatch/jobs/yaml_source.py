"""A job file as parsed YAML that remembers where each key was written, and the typed
getters the spec is read with: every error names the file, the line, the dotted key, what is
wrong and how to fix it."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class SpecError(ValueError):
    """A job spec problem, located: `jobs.yaml:12: input.path: what is wrong (fix: how)`."""


@dataclass(frozen=True)
class Source:
    """Where one job's values were written, to point an error at the right line."""

    file: str
    lines: dict[tuple, int]  # key path in the document -> 1-based line of the key
    job: tuple  # the job's own path: () for a single-job file, ("jobs", i) otherwise
    defaults: tuple | None  # ("defaults",) when the file has defaults merged under jobs

    def error(self, key: tuple, what: str, fix: str) -> SpecError:
        # The deepest written part of the key: a missing field points at its parent.
        origins = [o for o in (self.job, self.defaults) if o is not None]
        line, origin = next((self.lines[o + key[:n]], o) for n in range(len(key), -1, -1)
                            for o in origins if o + key[:n] in self.lines)
        return SpecError(f"{self.file}:{line}: {dotted(origin + key)}: {what} (fix: {fix})")


def parse_yaml(path: Path, file: str) -> tuple[Any, dict[tuple, int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{file}: cannot read the job file: {e} (fix: check the path)") from e
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or e
        raise SpecError(f"{file}{where}: not valid YAML: {problem} "
                        "(fix: check the indentation and quoting there)") from e
    finally:
        loader.dispose()
    lines: dict[tuple, int] = {(): node.start_mark.line + 1 if node is not None else 1}
    if node is not None:
        _index_lines(node, (), lines, file)
    return data, lines


def _index_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], file: str) -> None:
    """Record the line of every key and list item; refuse duplicate keys (YAML keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        written: dict[str, int] = {}
        for key_node, value_node in node.value:
            key, line = key_node.value, key_node.start_mark.line + 1
            # The loader flattens `<<: *anchor` merges into node.value; those keys were written
            # elsewhere, and this mapping may override them.
            if node.start_mark.index <= key_node.start_mark.index < node.end_mark.index:
                if key in written:
                    raise SpecError(f"{file}:{line}: {dotted(path + (key,))}: duplicate key, "
                                    f"first at line {written[key]} (fix: keep one of them)")
                written[key] = line
            lines[path + (key,)] = line
            _index_lines(value_node, path + (key,), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _index_lines(item, path + (i,), lines, file)


def annotation_types(annotation: str) -> tuple[type, ...]:
    """Loose runtime types for a field annotation such as 'str | list[str] | None'."""
    by_name = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
               "list": (list,), "dict": (dict,), "None": (type(None),)}
    types: tuple[type, ...] = ()
    for part in annotation.split("|"):
        types += by_name.get(part.strip().split("[")[0], (object,))
    return types


def check_keys(src: Source, value: dict, path: tuple, valid) -> None:
    for key in value:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1)
            raise src.error(path + (key,), f"unknown key {key!r}",
                            f"did you mean {close[0]!r}?" if close else
                            f"valid keys: {', '.join(sorted(valid))}")


def get(src: Source, value: dict, path: tuple, types) -> Any:
    """value[key], type-checked; None when absent (null means absent, to undo a default)."""
    item = value.get(path[-1])
    if item is not None:
        check_type(src, path, item, types if isinstance(types, tuple) else (types,), None)
    return item


def require(src: Source, value: dict, path: tuple, types, example: str) -> Any:
    item = get(src, value, path, types)
    if item is None:
        under = f" under `{dotted(path[:-1])}`" if path[:-1] else ""
        raise src.error(path, "missing required field", f"add `{path[-1]}: {example}`{under}")
    return item


def choice(src: Source, value: dict, path: tuple, allowed: tuple[str, ...]) -> str | None:
    item = get(src, value, path, str)
    if item is not None and item not in allowed:
        close = difflib.get_close_matches(item, allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise src.error(path, f"{item!r} is not one of {', '.join(allowed)}",
                        f"{hint}use one of {', '.join(allowed)}")
    return item


def count(src: Source, value: dict, path: tuple, minimum: int) -> int | None:
    item = get(src, value, path, int)
    if item is not None and item < minimum:
        raise src.error(path, f"must be >= {minimum}, got {item}",
                        f"use an integer >= {minimum}")
    return item


def number(src: Source, value: dict, path: tuple) -> float | None:
    item = get(src, value, path, (int, float))
    if item is not None and item < 0:
        raise src.error(path, f"must be >= 0, got {item}", "use a number >= 0")
    return item


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a mapping", type(None): "null"}


def check_type(src: Source, path: tuple, item: Any, types: tuple[type, ...],
                expected: str | None) -> None:
    # bool is an int subclass, but `window: true` is a mistake, not 1.
    if isinstance(item, types) and not (isinstance(item, bool) and bool not in types):
        return
    expected = expected or " or ".join(_TYPE_NAMES[t] for t in types)
    raise src.error(path, f"expected {expected}, got {show(item)}", f"write {expected}")


def show(item: Any) -> str:
    text = repr(item)
    return f"{text[:60]}... ({type(item).__name__})" if len(text) > 60 else text


def dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(top level)"
