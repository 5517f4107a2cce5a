"""The YAML job spec of `sglbatch run`: frozen dataclasses, validated with located errors.

A file holds one job (a mapping) or `jobs: [...]` (run in sequence), optionally with
`defaults:` deep-merged under each job. Every error names the file, the line of the
offending key, its dotted path, what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Formatter
from types import CodeType
from typing import Any

import yaml

from sglbatch.engine.sampling_params import SamplingParams

INPUT_FORMATS = ("jsonl", "parquet", "csv")
OUTPUT_FORMATS = ("jsonl", "parquet")
_FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}


class SpecError(ValueError):
    """A job spec problem, located: `jobs.yaml:12: input.path: what is wrong (fix: how)`."""


@dataclass(frozen=True)
class EndpointSpec:
    """A running server to send requests to instead of an in-process engine."""

    url: str
    api: str = "openai"  # openai: /v1/completions and /v1/chat/completions; native: /generate
    api_key_env: str | None = None  # the environment variable holding the API key
    model: str | None = None  # the model name the server expects in requests


@dataclass(frozen=True)
class InputSpec:
    """The dataset: files read in order, one row per record, ids from `id_column` (unique)."""

    paths: list[Path]
    format: str
    id_column: str | None = None
    limit: int | None = None  # first N rows after the filter, over the whole input
    filter: str | None = None  # a Python expression over the row's columns


@dataclass(frozen=True)
class OutputSpec:
    path: Path
    format: str
    keep_columns: list[str] = field(default_factory=list)  # input columns copied to each result
    mode: str = "resume"  # resume: skip ids already written; overwrite: start over
    sort_output: bool = False  # the output in input order (else completion order)


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One job. Exactly one of prompt / messages / program makes the requests."""

    name: str
    model: dict[str, Any] | None = None  # EngineConfig kwargs, model_path required
    endpoint: EndpointSpec | None = None
    input: InputSpec
    prompt: str | None = None  # a str.format template over the row's columns
    messages: str | list[dict[str, str]] | None = None  # a column, or {role, content} templates
    program: str | None = None  # '/abs/path/module.py:function'
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields
    sampling_column: str | None = None  # a column of per-row sampling overrides
    output: OutputSpec
    order: str = "prefix"  # prefix: rows sharing a prompt prefix run together; input: as read
    window: int = 10000  # rows reordered together under order: prefix
    max_inflight: int = 256
    max_errors: int | None = None
    chunk_rows: int = 1000  # rows per committed output chunk


def compile_filter(expr: str) -> CodeType:
    """Compile an `input.filter` expression (the loader does it first, to report syntax errors)."""
    return compile(expr, "<input.filter>", "eval")


def format_from_suffix(path: Path) -> str | None:
    return _FORMAT_BY_SUFFIX.get(path.suffix.lower())


_INPUT_KEYS = ("path", "format", "id_column", "limit", "filter")
_MESSAGE_KEYS = ("role", "content")
_TEMPLATE_FIX = "name columns as {column}; write literal braces as {{ and }}"


def load_jobs(path: str | Path) -> list[JobSpec]:
    """Parse and validate a job file; relative paths in it are resolved from its directory."""
    path = Path(path)
    file = str(path)
    data, lines = _parse(path, file)
    top = _Source(file, lines, (), None)
    base = path.parent.absolute()  # resolved paths stay right whatever the cwd is later
    if not isinstance(data, dict):
        raise top.error((), "expected a job (a mapping) or `jobs:` (a list of jobs)",
                        "write a job's fields (input, output, model or endpoint, prompt) "
                        "at the top level, or a `jobs:` list of them")
    if "jobs" not in data:
        return [_job(top, data, base, path.stem)]

    for key in data:
        if key in _keys(JobSpec):
            raise top.error((key,), "job fields go inside each entry of `jobs:`",
                            "move it into the jobs, or under `defaults:` to share it")
    _check_keys(top, data, (), ("jobs", "defaults"))
    entries = _require(top, data, ("jobs",), list, "[{input: ..., output: ...}]")
    if not entries:
        raise top.error(("jobs",), "the list is empty", "add at least one job")
    defaults = _get(top, data, ("defaults",), dict) or {}
    first_job: dict[tuple[str, Any], int] = {}  # (field, value) -> the job that has it
    specs = []
    for i, entry in enumerate(entries):
        src = _Source(file, lines, ("jobs", i), ("defaults",) if defaults else None)
        if not isinstance(entry, dict):
            raise src.error((), f"expected a job (a mapping), got {_show(entry)}",
                            "write each job as a mapping of its fields")
        spec = _job(src, _deep_merge(defaults, entry), base, f"{path.stem}-{i}")
        for what, key in (("name", spec.name), ("output.path", spec.output.path)):
            if (what, key) in first_job:
                raise src.error(tuple(what.split(".")), f"{key} is also the {what} of "
                                f"jobs[{first_job[what, key]}]", f"give each job its own {what}")
            first_job[what, key] = i
        specs.append(spec)
    return specs


@dataclass(frozen=True)
class _Source:
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
        return SpecError(f"{self.file}:{line}: {_dotted(origin + key)}: {what} (fix: {fix})")


def _parse(path: Path, file: str) -> tuple[Any, dict[tuple, int]]:
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
                    raise SpecError(f"{file}:{line}: {_dotted(path + (key,))}: duplicate key, "
                                    f"first at line {written[key]} (fix: keep one of them)")
                written[key] = line
            lines[path + (key,)] = line
            _index_lines(value_node, path + (key,), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _index_lines(item, path + (i,), lines, file)


def _job(src: _Source, raw: dict, base: Path, default_name: str) -> JobSpec:
    _check_keys(src, raw, (), _keys(JobSpec))
    model, endpoint = _model(src, raw, base), _endpoint(src, raw)
    if (model is None) == (endpoint is None):
        both = model is not None
        raise src.error(("endpoint",) if both else ("model",),
                        "model and endpoint are both set" if both else "neither model nor "
                        "endpoint is set", "keep one" if both else
                        "add `model: {model_path: ...}` to run in-process, or "
                        "`endpoint: {url: ...}` to use a server")
    makers = [k for k in ("prompt", "messages", "program") if raw.get(k) is not None]
    if len(makers) != 1:
        raise src.error((makers[1],) if makers else ("prompt",),
                        f"{' and '.join(makers)} are both set" if makers else
                        "no prompt, messages or program", "set exactly one of prompt, "
                        "messages or program")
    return JobSpec(
        name=_get(src, raw, ("name",), str) or default_name,
        model=model,
        endpoint=endpoint,
        input=_input(src, raw, base),
        prompt=_template(src, raw, ("prompt",)),
        messages=_messages(src, raw),
        program=_program(src, raw, base),
        sampling=_dataclass_kwargs(src, raw, ("sampling",), SamplingParams,
                                   _verify_job_sampling) or {},
        sampling_column=_get(src, raw, ("sampling_column",), str),
        output=_output(src, raw, base),
        order=_choice(src, raw, ("order",), ("prefix", "input")) or "prefix",
        window=_count(src, raw, ("window",), 1) or 10000,
        max_inflight=_count(src, raw, ("max_inflight",), 1) or 256,
        max_errors=_count(src, raw, ("max_errors",), 0),
        chunk_rows=_count(src, raw, ("chunk_rows",), 1) or 1000,
    )


def _under(base: Path, value: str) -> Path:
    """A path from the job file, relative to its directory, without `..` left in it."""
    return Path(os.path.normpath(base / Path(value).expanduser()))


def _model(src: _Source, raw: dict, base: Path) -> dict[str, Any] | None:
    if raw.get("model") is None:
        return None
    # EngineConfig imports torch: only a spec with a model section pays for it.
    from sglbatch.engine.config import EngineConfig

    model = _dataclass_kwargs(src, raw, ("model",), EngineConfig, lambda kw: EngineConfig(**kw))
    model_path = _require(src, model, ("model", "model_path"), str, "smollm2-135m-instruct")
    local = _under(base, model_path)
    if local.exists():  # a directory or .gguf next to the job file; else an alias or cwd path
        model["model_path"] = str(local)
    return model


def _endpoint(src: _Source, raw: dict) -> EndpointSpec | None:
    value = _get(src, raw, ("endpoint",), dict)
    if value is None:
        return None
    _check_keys(src, value, ("endpoint",), _keys(EndpointSpec))
    url = _require(src, value, ("endpoint", "url"), str, "http://localhost:30000")
    if not url.startswith(("http://", "https://")):
        raise src.error(("endpoint", "url"), f"{url!r} is not an http(s) URL",
                        "write the full URL, e.g. http://localhost:30000")
    return EndpointSpec(
        url=url,
        api=_choice(src, value, ("endpoint", "api"), ("openai", "native")) or "openai",
        api_key_env=_get(src, value, ("endpoint", "api_key_env"), str),
        model=_get(src, value, ("endpoint", "model"), str),
    )


def _input(src: _Source, raw: dict, base: Path) -> InputSpec:
    value = _require(src, raw, ("input",), dict, "{path: data.jsonl}")
    _check_keys(src, value, ("input",), _INPUT_KEYS)
    pattern = _require(src, value, ("input", "path"), str, "data/*.jsonl")
    full = _under(base, pattern)
    # A literal name may hold glob characters ([...]); only a missing file is globbed.
    paths = [full] if full.is_file() else sorted(
        Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
    if not paths:
        raise src.error(("input", "path"), f"no file matches {pattern!r}",
                        f"check the path; relative paths start from the job file's directory "
                        f"({base})")
    expr = _get(src, value, ("input", "filter"), str)
    if expr is not None:
        try:
            compile_filter(expr)
        except SyntaxError as e:
            raise src.error(("input", "filter"), f"not a Python expression: {e.msg}",
                            "write an expression over the row's columns, e.g. "
                            "len(question) < 500") from None
    return InputSpec(
        paths=paths,
        format=_format(src, value, ("input",), paths, INPUT_FORMATS),
        id_column=_get(src, value, ("input", "id_column"), str),
        limit=_count(src, value, ("input", "limit"), 1),
        filter=expr,
    )


def _output(src: _Source, raw: dict, base: Path) -> OutputSpec:
    value = _require(src, raw, ("output",), dict, "{path: results.jsonl}")
    _check_keys(src, value, ("output",), _keys(OutputSpec))
    path = _under(base, _require(src, value, ("output", "path"), str, "results.jsonl"))
    keep = _get(src, value, ("output", "keep_columns"), list) or []
    for i, column in enumerate(keep):
        if not isinstance(column, str):
            raise src.error(("output", "keep_columns", i), f"expected a column name, got "
                            f"{_show(column)}", "list column names, e.g. [id, question]")
    return OutputSpec(
        path=path,
        format=_format(src, value, ("output",), [path], OUTPUT_FORMATS),
        keep_columns=keep,
        mode=_choice(src, value, ("output", "mode"), ("resume", "overwrite")) or "resume",
        sort_output=_get(src, value, ("output", "sort_output"), bool) or False,
    )


def _format(src: _Source, value: dict, path: tuple, paths: list[Path],
            allowed: tuple[str, ...]) -> str:
    """The `format` field, else the one format the files' extensions say."""
    given = _choice(src, value, path + ("format",), allowed)
    if given is not None:
        return given
    formats = {format_from_suffix(p) for p in paths}
    if len(formats) == 1 and formats <= set(allowed):
        return formats.pop()
    suffixes = sorted({p.suffix.lower() or "(none)" for p in paths})
    what = (f"files of different formats ({', '.join(suffixes)})" if len(formats) > 1
            else f"the extension {suffixes[0]} is not one of "
            + ", ".join(s for s, f in _FORMAT_BY_SUFFIX.items() if f in allowed))
    raise src.error(path + ("path",), what, f"set {_dotted(path + ('format',))} to one of "
                    f"{', '.join(allowed)}")


def _template(src: _Source, raw: dict, path: tuple) -> str | None:
    text = _get(src, raw, path, str)
    if text is None:
        return None
    try:
        names = [name for _, name, _, _ in Formatter().parse(text) if name is not None]
    except ValueError as e:
        raise src.error(path, f"not a valid template: {e}", _TEMPLATE_FIX) from None
    for name in names:
        if name == "" or name.isdigit():
            raise src.error(path, f"the template has a positional field {{{name}}}",
                            _TEMPLATE_FIX)
    return text


def _messages(src: _Source, raw: dict) -> str | list[dict[str, str]] | None:
    value = _get(src, raw, ("messages",), (str, list))
    if not isinstance(value, list):
        return value  # None, or the column holding each row's messages
    if not value:
        raise src.error(("messages",), "the list is empty",
                        "add {role: user, content: '...'} templates, or name a column")
    for i, message in enumerate(value):
        path = ("messages", i)
        if not isinstance(message, dict):
            raise src.error(path, f"expected {{role, content}}, got {_show(message)}",
                            "write each message as {role: user, content: '...'}")
        _check_keys(src, message, path, _MESSAGE_KEYS)
        _require(src, message, path + ("role",), str, "user")
        _require(src, message, path + ("content",), str, "'Q: {question}'")
        _template(src, message, path + ("content",))
    return value


def _program(src: _Source, raw: dict, base: Path) -> str | None:
    text = _get(src, raw, ("program",), str)
    if text is None:
        return None
    module, _, name = text.rpartition(":")
    if not module or not name.isidentifier():
        raise src.error(("program",), f"{text!r} is not 'path/to/module.py:function'",
                        "name the file and the function, e.g. program: prompts.py:build")
    file = _under(base, module)
    if not file.is_file():
        raise src.error(("program",), f"no file {module!r}", f"check the path; relative paths "
                        f"start from the job file's directory ({base})")
    return f"{file}:{name}"


def _dataclass_kwargs(src: _Source, raw: dict, path: tuple, cls: type,
                      check: Callable[[dict], Any]) -> dict[str, Any] | None:
    """A mapping of `cls` field names, each value of the field's type, passing `check`
    together (fields may constrain each other, e.g. min_new_tokens <= max_new_tokens)."""
    value = _get(src, raw, path, dict)
    if value is None:
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(src, value, path, fields)
    for key, item in value.items():
        annotation = str(fields[key].type)
        _check_type(src, path + (key,), item, _annotation_types(annotation), annotation)
    try:
        check(dict(value))
    except (TypeError, ValueError) as e:
        message = str(e).removeprefix("sampling_params.")
        # Messages start with the field at fault; name it, else the whole mapping.
        at_fault = next((k for k in value if re.match(rf"{re.escape(k)}\b", message)), None)
        where = path + (at_fault,) if at_fault else path
        raise src.error(where, message, f"change or remove {_dotted(where)}") from None
    return dict(value)


# A job writes one record per row; n samples would need n records under one id.
JOB_N_MESSAGE = "n must be 1 in a job (one record per row); to sample a row k times, repeat it"


def _verify_job_sampling(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs).verify()
    if kwargs.get("n", 1) != 1:
        raise ValueError(f"sampling_params.n: {JOB_N_MESSAGE}")


def _annotation_types(annotation: str) -> tuple[type, ...]:
    """Loose runtime types for a field annotation such as 'str | list[str] | None'."""
    by_name = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,),
               "list": (list,), "dict": (dict,), "None": (type(None),)}
    types: tuple[type, ...] = ()
    for part in annotation.split("|"):
        types += by_name.get(part.strip().split("[")[0], (object,))
    return types


def _check_keys(src: _Source, value: dict, path: tuple, valid) -> None:
    for key in value:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1)
            raise src.error(path + (key,), f"unknown key {key!r}",
                            f"did you mean {close[0]!r}?" if close else
                            f"valid keys: {', '.join(sorted(valid))}")


def _get(src: _Source, value: dict, path: tuple, types) -> Any:
    """value[key], type-checked; None when absent (null means absent, to undo a default)."""
    item = value.get(path[-1])
    if item is not None:
        _check_type(src, path, item, types if isinstance(types, tuple) else (types,), None)
    return item


def _require(src: _Source, value: dict, path: tuple, types, example: str) -> Any:
    item = _get(src, value, path, types)
    if item is None:
        under = f" under `{_dotted(path[:-1])}`" if path[:-1] else ""
        raise src.error(path, "missing required field", f"add `{path[-1]}: {example}`{under}")
    return item


def _choice(src: _Source, value: dict, path: tuple, allowed: tuple[str, ...]) -> str | None:
    item = _get(src, value, path, str)
    if item is not None and item not in allowed:
        close = difflib.get_close_matches(item, allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise src.error(path, f"{item!r} is not one of {', '.join(allowed)}",
                        f"{hint}use one of {', '.join(allowed)}")
    return item


def _count(src: _Source, value: dict, path: tuple, minimum: int) -> int | None:
    item = _get(src, value, path, int)
    if item is not None and item < minimum:
        raise src.error(path, f"must be >= {minimum}, got {item}",
                        f"use an integer >= {minimum}")
    return item


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a mapping", type(None): "null"}


def _check_type(src: _Source, path: tuple, item: Any, types: tuple[type, ...],
                expected: str | None) -> None:
    # bool is an int subclass, but `window: true` is a mistake, not 1.
    if isinstance(item, types) and not (isinstance(item, bool) and bool not in types):
        return
    expected = expected or " or ".join(_TYPE_NAMES[t] for t in types)
    raise src.error(path, f"expected {expected}, got {_show(item)}", f"write {expected}")


def _show(item: Any) -> str:
    text = repr(item)
    return f"{text[:60]}... ({type(item).__name__})" if len(text) > 60 else text


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "(top level)"


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        old = merged.get(key)
        merged[key] = (_deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict)
                       else value)
    return merged
