"""The YAML job spec of `sglbatch run`: frozen dataclasses, validated with located errors.

A file holds one job (a mapping) or `jobs: [...]` (run in sequence), optionally with
`defaults:` deep-merged under each job. Every error names the file, the line of the
offending key, its dotted path, what is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from string import Formatter
from types import CodeType
from typing import Any

from sglbatch.engine.sampling_params import SamplingParams
from sglbatch.jobs.yaml_source import (
    Source,
    annotation_types,
    check_keys,
    check_type,
    choice,
    count,
    dotted,
    get,
    number,
    parse_yaml,
    require,
    show,
)

INPUT_FORMATS = ("jsonl", "parquet", "csv")
OUTPUT_FORMATS = ("jsonl", "parquet")
EXECUTORS = ("local", "ray")
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")  # s3://bucket/..., file:///data/...
RAY_INSTALL = 'pip install "sglbatch[ray]"'  # the extra that executor: ray needs
_FORMAT_BY_SUFFIX = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}


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

    paths: list[Path]  # local files; empty when `uri` names the input
    format: str
    id_column: str | None = None
    uri: str | None = None  # s3://, gs://, file://... (a glob allowed), read by executor: ray
    limit: int | None = None  # first N rows after the filter, over the whole input
    filter: str | None = None  # a Python expression over the row's columns


@dataclass(frozen=True)
class OutputSpec:
    path: Path
    format: str
    keep_columns: list[str] = field(default_factory=list)  # input columns copied to each result
    mode: str = "resume"  # resume: skip ids already written; overwrite: start over
    sort_output: bool = False  # the output in input order (else completion order)


@dataclass(frozen=True)
class RaySpec:
    """`executor: ray`: the cluster, and the engine replicas (Ray actors) the rows run on."""

    address: str | None = None  # None: ray.init()'s default (RAY_ADDRESS, else a local Ray)
    replicas: int = 1  # actors, each owning one Engine(**model) (its dp/tp as the model says)
    num_cpus_per_replica: float = 1
    num_gpus_per_replica: float = 0
    batch_size: int = 64  # rows per batch sent to a replica; each batch is committed whole


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
    executor: str = "local"  # local: this process's engine; ray: replicas on a Ray cluster
    ray: RaySpec = field(default_factory=RaySpec)


def compile_filter(expr: str) -> CodeType:
    """Compile an `input.filter` expression (the loader does it first, to report syntax errors)."""
    return compile(expr, "<input.filter>", "eval")


def format_from_suffix(path: Path) -> str | None:
    return _FORMAT_BY_SUFFIX.get(path.suffix.lower())


_INPUT_KEYS = ("path", "format", "id_column", "limit", "filter")
_MESSAGE_KEYS = ("role", "content")
_TEMPLATE_FIX = "name columns as {column}; write literal braces as {{ and }}"


def load_jobs(path: str | Path, executor: str | None = None) -> list[JobSpec]:
    """Parse and validate a job file; relative paths in it are resolved from its directory.
    `executor` (`sglbatch run --executor`) replaces every job's."""
    path = Path(path)
    file = str(path)
    data, lines = parse_yaml(path, file)
    top = Source(file, lines, (), None)
    base = path.parent.absolute()  # resolved paths stay right whatever the cwd is later
    if not isinstance(data, dict):
        raise top.error((), "expected a job (a mapping) or `jobs:` (a list of jobs)",
                        "write a job's fields (input, output, model or endpoint, prompt) "
                        "at the top level, or a `jobs:` list of them")
    if "jobs" not in data:
        return [_job(top, data, base, path.stem, executor)]

    for key in data:
        if key in _keys(JobSpec):
            raise top.error((key,), "job fields go inside each entry of `jobs:`",
                            "move it into the jobs, or under `defaults:` to share it")
    check_keys(top, data, (), ("jobs", "defaults"))
    entries = require(top, data, ("jobs",), list, "[{input: ..., output: ...}]")
    if not entries:
        raise top.error(("jobs",), "the list is empty", "add at least one job")
    defaults = get(top, data, ("defaults",), dict) or {}
    first_job: dict[tuple[str, Any], int] = {}  # (field, value) -> the job that has it
    specs = []
    for i, entry in enumerate(entries):
        src = Source(file, lines, ("jobs", i), ("defaults",) if defaults else None)
        if not isinstance(entry, dict):
            raise src.error((), f"expected a job (a mapping), got {show(entry)}",
                            "write each job as a mapping of its fields")
        spec = _job(src, _deep_merge(defaults, entry), base, f"{path.stem}-{i}", executor)
        for what, key in (("name", spec.name), ("output.path", spec.output.path)):
            if (what, key) in first_job:
                raise src.error(tuple(what.split(".")), f"{key} is also the {what} of "
                                f"jobs[{first_job[what, key]}]", f"give each job its own {what}")
            first_job[what, key] = i
        specs.append(spec)
    return specs


def _job(src: Source, raw: dict, base: Path, default_name: str,
         executor: str | None) -> JobSpec:
    check_keys(src, raw, (), _keys(JobSpec))
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
    executor = executor or choice(src, raw, ("executor",), EXECUTORS) or "local"
    if executor == "ray":
        _check_ray_job(src, raw)
    return JobSpec(
        name=get(src, raw, ("name",), str) or default_name,
        model=model,
        endpoint=endpoint,
        input=_input(src, raw, base, executor),
        prompt=_template(src, raw, ("prompt",)),
        messages=_messages(src, raw),
        program=_program(src, raw, base),
        sampling=_dataclass_kwargs(src, raw, ("sampling",), SamplingParams,
                                   _verify_job_sampling) or {},
        sampling_column=get(src, raw, ("sampling_column",), str),
        output=_output(src, raw, base),
        order=choice(src, raw, ("order",), ("prefix", "input")) or "prefix",
        window=count(src, raw, ("window",), 1) or 10000,
        max_inflight=count(src, raw, ("max_inflight",), 1) or 256,
        max_errors=count(src, raw, ("max_errors",), 0),
        chunk_rows=count(src, raw, ("chunk_rows",), 1) or 1000,
        executor=executor,
        ray=_ray(src, raw),
    )


def _check_ray_job(src: Source, raw: dict) -> None:
    if raw.get("endpoint") is not None:
        raise src.error(("executor",), "ray runs in-process engines, not an endpoint",
                        "use `model:` with executor: ray, or executor: local for an endpoint")
    if raw.get("program") is not None:
        raise src.error(("executor",), "ray runs prompt and messages jobs only",
                        "use executor: local for a program job")
    if importlib.util.find_spec("ray") is None:
        raise src.error(("executor",), "Ray is not installed",
                        RAY_INSTALL)


def _ray(src: Source, raw: dict) -> RaySpec:
    value = get(src, raw, ("ray",), dict)
    if value is None:
        return RaySpec()
    check_keys(src, value, ("ray",), _keys(RaySpec))
    default = RaySpec()
    cpus = number(src, value, ("ray", "num_cpus_per_replica"))
    gpus = number(src, value, ("ray", "num_gpus_per_replica"))
    return RaySpec(
        address=get(src, value, ("ray", "address"), str),
        replicas=count(src, value, ("ray", "replicas"), 1) or default.replicas,
        num_cpus_per_replica=default.num_cpus_per_replica if cpus is None else cpus,
        num_gpus_per_replica=default.num_gpus_per_replica if gpus is None else gpus,
        batch_size=count(src, value, ("ray", "batch_size"), 1) or default.batch_size,
    )


def _under(base: Path, value: str) -> Path:
    """A path from the job file, relative to its directory, without `..` left in it."""
    return Path(os.path.normpath(base / Path(value).expanduser()))


def _model(src: Source, raw: dict, base: Path) -> dict[str, Any] | None:
    if raw.get("model") is None:
        return None
    # EngineConfig imports torch: only a spec with a model section pays for it.
    from sglbatch.engine.config import EngineConfig

    model = _dataclass_kwargs(src, raw, ("model",), EngineConfig, lambda kw: EngineConfig(**kw))
    model_path = require(src, model, ("model", "model_path"), str, "smollm2-135m-instruct")
    local = _under(base, model_path)
    if local.exists():  # a directory or .gguf next to the job file; else an alias or cwd path
        model["model_path"] = str(local)
    return model


def _endpoint(src: Source, raw: dict) -> EndpointSpec | None:
    value = get(src, raw, ("endpoint",), dict)
    if value is None:
        return None
    check_keys(src, value, ("endpoint",), _keys(EndpointSpec))
    url = require(src, value, ("endpoint", "url"), str, "http://localhost:30000")
    if not url.startswith(("http://", "https://")):
        raise src.error(("endpoint", "url"), f"{url!r} is not an http(s) URL",
                        "write the full URL, e.g. http://localhost:30000")
    return EndpointSpec(
        url=url,
        api=choice(src, value, ("endpoint", "api"), ("openai", "native")) or "openai",
        api_key_env=get(src, value, ("endpoint", "api_key_env"), str),
        model=get(src, value, ("endpoint", "model"), str),
    )


def _input(src: Source, raw: dict, base: Path, executor: str) -> InputSpec:
    value = require(src, raw, ("input",), dict, "{path: data.jsonl}")
    check_keys(src, value, ("input",), _INPUT_KEYS)
    pattern = require(src, value, ("input", "path"), str, "data/*.jsonl")
    uri = pattern if _URI.match(pattern) else None
    if uri is not None and executor != "ray":
        raise src.error(("input", "path"), "a URI input is read on a Ray cluster",
                        "set executor: ray (it reads s3://, gs:// and any fsspec filesystem), "
                        "or copy the files to a local path")
    full = _under(base, pattern)
    # A literal name may hold glob characters ([...]); only a missing file is globbed. A URI
    # is listed when the job runs, on its filesystem.
    paths = [] if uri is not None else [full] if full.is_file() else sorted(
        Path(p) for p in glob.glob(str(full), recursive=True) if Path(p).is_file())
    if not paths and uri is None:
        raise src.error(("input", "path"), f"no file matches {pattern!r}",
                        f"check the path; relative paths start from the job file's directory "
                        f"({base})")
    expr = get(src, value, ("input", "filter"), str)
    if expr is not None:
        try:
            compile_filter(expr)
        except SyntaxError as e:
            raise src.error(("input", "filter"), f"not a Python expression: {e.msg}",
                            "write an expression over the row's columns, e.g. "
                            "len(question) < 500") from None
    return InputSpec(
        paths=paths,
        format=_format(src, value, ("input",), paths or [Path(pattern)], INPUT_FORMATS),
        id_column=get(src, value, ("input", "id_column"), str),
        uri=uri,
        limit=count(src, value, ("input", "limit"), 1),
        filter=expr,
    )


def _output(src: Source, raw: dict, base: Path) -> OutputSpec:
    value = require(src, raw, ("output",), dict, "{path: results.jsonl}")
    check_keys(src, value, ("output",), _keys(OutputSpec))
    path = _under(base, require(src, value, ("output", "path"), str, "results.jsonl"))
    keep = get(src, value, ("output", "keep_columns"), list) or []
    for i, column in enumerate(keep):
        if not isinstance(column, str):
            raise src.error(("output", "keep_columns", i), f"expected a column name, got "
                            f"{show(column)}", "list column names, e.g. [id, question]")
    return OutputSpec(
        path=path,
        format=_format(src, value, ("output",), [path], OUTPUT_FORMATS),
        keep_columns=keep,
        mode=choice(src, value, ("output", "mode"), ("resume", "overwrite")) or "resume",
        sort_output=get(src, value, ("output", "sort_output"), bool) or False,
    )


def _format(src: Source, value: dict, path: tuple, paths: list[Path],
            allowed: tuple[str, ...]) -> str:
    """The `format` field, else the one format the files' extensions say."""
    given = choice(src, value, path + ("format",), allowed)
    if given is not None:
        return given
    formats = {format_from_suffix(p) for p in paths}
    if len(formats) == 1 and formats <= set(allowed):
        return formats.pop()
    suffixes = sorted({p.suffix.lower() or "(none)" for p in paths})
    what = (f"files of different formats ({', '.join(suffixes)})" if len(formats) > 1
            else f"the extension {suffixes[0]} is not one of "
            + ", ".join(s for s, f in _FORMAT_BY_SUFFIX.items() if f in allowed))
    raise src.error(path + ("path",), what, f"set {dotted(path + ('format',))} to one of "
                    f"{', '.join(allowed)}")


def _template(src: Source, raw: dict, path: tuple) -> str | None:
    text = get(src, raw, path, str)
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


def _messages(src: Source, raw: dict) -> str | list[dict[str, str]] | None:
    value = get(src, raw, ("messages",), (str, list))
    if not isinstance(value, list):
        return value  # None, or the column holding each row's messages
    if not value:
        raise src.error(("messages",), "the list is empty",
                        "add {role: user, content: '...'} templates, or name a column")
    for i, message in enumerate(value):
        path = ("messages", i)
        if not isinstance(message, dict):
            raise src.error(path, f"expected {{role, content}}, got {show(message)}",
                            "write each message as {role: user, content: '...'}")
        check_keys(src, message, path, _MESSAGE_KEYS)
        require(src, message, path + ("role",), str, "user")
        require(src, message, path + ("content",), str, "'Q: {question}'")
        _template(src, message, path + ("content",))
    return value


def _program(src: Source, raw: dict, base: Path) -> str | None:
    text = get(src, raw, ("program",), str)
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


def _dataclass_kwargs(src: Source, raw: dict, path: tuple, cls: type,
                      check: Callable[[dict], Any]) -> dict[str, Any] | None:
    """A mapping of `cls` field names, each value of the field's type, passing `check`
    together (fields may constrain each other, e.g. min_new_tokens <= max_new_tokens)."""
    value = get(src, raw, path, dict)
    if value is None:
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(src, value, path, fields)
    for key, item in value.items():
        annotation = str(fields[key].type)
        check_type(src, path + (key,), item, annotation_types(annotation), annotation)
    try:
        check(dict(value))
    except (TypeError, ValueError) as e:
        message = str(e).removeprefix("sampling_params.")
        # Messages start with the field at fault; name it, else the whole mapping.
        at_fault = next((k for k in value if re.match(rf"{re.escape(k)}\b", message)), None)
        where = path + (at_fault,) if at_fault else path
        raise src.error(where, message, f"change or remove {dotted(where)}") from None
    return dict(value)


# A job writes one record per row; n samples would need n records under one id.
JOB_N_MESSAGE = "n must be 1 in a job (one record per row); to sample a row k times, repeat it"


def _verify_job_sampling(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs).verify()
    if kwargs.get("n", 1) != 1:
        raise ValueError(f"sampling_params.n: {JOB_N_MESSAGE}")


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        old = merged.get(key)
        merged[key] = (_deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict)
                       else value)
    return merged
