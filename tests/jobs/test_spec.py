"""Job spec loading: defaults, path resolution, and located errors that say how to fix them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sglbatch.jobs.spec import EndpointSpec, load_jobs
from sglbatch.jobs.yaml_source import SpecError

BASE = """\
model:
  model_path: smollm2-135m-instruct
input:
  path: data/q.jsonl
prompt: "Q: {question}\\nA:"
output:
  path: out/results.jsonl
"""


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    for name in ("q.jsonl", "q2.jsonl", "q.parquet", "q.txt"):
        (tmp_path / "data" / name).write_text("")
    (tmp_path / "prompts.py").write_text("def build(row):\n    return row['question']\n")
    return tmp_path


def write(job_dir: Path, text: str) -> Path:
    path = job_dir / "jobs.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def spec_error(path: Path, line: int, key: str) -> tuple[str, str]:
    """Load `path`, expecting an error located at `line` and `key`: (what, fix)."""
    with pytest.raises(SpecError) as e:
        load_jobs(path)
    message = str(e.value)
    assert message.startswith(f"{path}:{line}: {key}: "), message
    what, sep, fix = message.partition(" (fix: ")
    assert sep and fix.endswith(")"), message
    return what, fix


def test_single_job_defaults_and_paths(job_dir: Path) -> None:
    [job] = load_jobs(write(job_dir, BASE + "sampling: {temperature: 0, max_new_tokens: 8}\n"))
    assert job.name == "jobs"
    assert job.model == {"model_path": "smollm2-135m-instruct"}  # an alias stays as written
    assert job.endpoint is None
    assert job.input.paths == [job_dir / "data" / "q.jsonl"]
    assert job.input.format == "jsonl"
    assert job.prompt == "Q: {question}\nA:"
    assert job.sampling == {"temperature": 0, "max_new_tokens": 8}
    assert job.output.path == job_dir / "out" / "results.jsonl"
    assert (job.output.format, job.output.mode, job.output.sort_output) == ("jsonl", "resume", False)
    assert job.output.keep_columns == []
    assert (job.order, job.window, job.max_inflight, job.max_errors, job.chunk_rows) == (
        "prefix", 10000, 256, None, 1000)


def test_several_jobs_with_defaults(job_dir: Path) -> None:
    path = write(job_dir, """\
        defaults:
          model: {model_path: smollm2-135m-instruct, dtype: float32}
          input: {path: "data/q*.jsonl", limit: 5}
          prompt: "{question}"
          sampling: {temperature: 0}
        jobs:
          - output: {path: a.parquet, sort_output: true}
            sampling: {max_new_tokens: 4}
          - name: chat
            prompt: null
            messages:
              - {role: system, content: Be brief.}
              - {role: user, content: "{question}"}
            input: {limit: 2, filter: len(question) < 500, id_column: qid}
            output: {path: b.jsonl, keep_columns: [question], mode: overwrite}
        """)
    first, second = load_jobs(path)
    assert (first.name, second.name) == ("jobs-0", "chat")
    assert first.model == second.model == {"model_path": "smollm2-135m-instruct",
                                            "dtype": "float32"}
    assert first.sampling == {"temperature": 0, "max_new_tokens": 4}  # merged, not replaced
    assert first.input.paths == [job_dir / "data" / "q.jsonl", job_dir / "data" / "q2.jsonl"]
    assert first.input.limit == 5 and second.input.limit == 2
    assert (second.input.filter, second.input.id_column) == ("len(question) < 500", "qid")
    assert first.output.format == "parquet" and first.output.sort_output
    assert second.prompt is None and second.messages[1] == {"role": "user",
                                                            "content": "{question}"}
    assert second.output.keep_columns == ["question"] and second.output.mode == "overwrite"


def test_endpoint_program_and_explicit_formats(job_dir: Path) -> None:
    [job] = load_jobs(write(job_dir, """\
        endpoint: {url: "http://localhost:30000", api_key_env: KEY}
        input: {path: data/q.txt, format: csv}
        program: prompts.py:build
        output: {path: out.data, format: parquet}
        """))
    assert job.model is None
    assert job.endpoint == EndpointSpec(url="http://localhost:30000", api="openai",
                                        api_key_env="KEY")
    assert job.input.format == "csv" and job.output.format == "parquet"
    assert job.program == f"{job_dir / 'prompts.py'}:build"


def test_yaml_merge_keys_are_not_duplicates(job_dir: Path) -> None:
    text = """\
        defaults:
          input: &base {path: data/q.jsonl, limit: 3}
        jobs:
          - model: {model_path: m}
            prompt: "{q}"
            input: {<<: *base, limit: 5}
            output: {path: a.jsonl}
          - model: {model_path: m}
            prompt: "{q}"
            input: {<<: *base, limit: 0}
            output: {path: b.jsonl}
        """
    what, _ = spec_error(write(job_dir, text), 10, "jobs[1].input.limit")
    assert what.endswith("must be >= 1, got 0")
    jobs = load_jobs(write(job_dir, text.replace("limit: 0", "limit: 7")))
    assert [job.input.limit for job in jobs] == [5, 7]


def test_model_path_next_to_the_job_file_is_resolved(job_dir: Path) -> None:
    (job_dir / "model.gguf").write_text("")
    text = BASE.replace("smollm2-135m-instruct", "model.gguf")
    [job] = load_jobs(write(job_dir, text))
    assert job.model == {"model_path": str(job_dir / "model.gguf")}


# (file text, line, dotted key, a fragment of what is wrong, a fragment of the fix)
ERRORS = [
    (BASE + "promt: hi\n", 8, "promt", "unknown key 'promt'", "did you mean 'prompt'?"),
    (BASE.replace("path: data/q.jsonl", "path: data/q.jsonl\n  limt: 3"), 5, "input.limt",
     "unknown key 'limt'", "did you mean 'limit'?"),
    (BASE + "sampling:\n  temprature: 0\n", 9, "sampling.temprature", "unknown key",
     "did you mean 'temperature'?"),
    (BASE.replace("model_path: smollm2-135m-instruct", "model_path: x\n  dtpye: float32"), 3,
     "model.dtpye", "unknown key", "did you mean 'dtype'?"),
    (BASE.replace("  path: data/q.jsonl\n", "  limit: 3\n"), 3, "input.path",
     "missing required field", "add `path: data/*.jsonl` under `input`"),
    (BASE.replace("output:\n  path: out/results.jsonl\n", ""), 1, "output",
     "missing required field", "add `output: "),
    (BASE + "window: ten\n", 8, "window", "expected an integer, got 'ten'", "write an integer"),
    (BASE + "max_inflight: true\n", 8, "max_inflight", "expected an integer, got True",
     "write an integer"),
    (BASE + "chunk_rows: 0\n", 8, "chunk_rows", "must be >= 1, got 0", "an integer >= 1"),
    (BASE + "order: prefx\n", 8, "order", "'prefx' is not one of prefix, input",
     "did you mean 'prefix'?"),
    (BASE + "  mode: append\n", 8, "output.mode", "'append' is not one of resume, overwrite",
     "use one of resume, overwrite"),
    (BASE.replace("data/q.jsonl", "data/x.jsonl"), 4, "input.path",
     "no file matches 'data/x.jsonl'", "relative paths start from the job file's directory"),
    (BASE.replace("data/q.jsonl", "data/q.txt"), 4, "input.path",
     "the extension .txt is not one of", "set input.format to one of jsonl, parquet, csv"),
    (BASE.replace("out/results.jsonl", "out/results.csv"), 7, "output.path",
     "the extension .csv is not one of .jsonl, .ndjson, .parquet", "set output.format"),
    (BASE.replace("data/q.jsonl", "data/q*"), 4, "input.path", "files of different formats",
     "set input.format"),
    (BASE + "messages: chat\n", 8, "messages", "prompt and messages are both set",
     "set exactly one of prompt, messages or program"),
    (BASE.replace('prompt: "Q: {question}\\nA:"\n', ""), 1, "prompt",
     "no prompt, messages or program", "set exactly one"),
    (BASE + "endpoint: {url: 'http://h:1'}\n", 8, "endpoint", "model and endpoint are both set",
     "keep one"),
    (BASE.replace("model:\n  model_path: smollm2-135m-instruct\n", ""), 1, "model",
     "neither model nor endpoint is set", "`endpoint: {url: ...}`"),
    (BASE.replace("model:\n  model_path: smollm2-135m-instruct\n", "endpoint: {url: h:1}\n"), 1,
     "endpoint.url", "'h:1' is not an http(s) URL", "write the full URL"),
    (BASE.replace("  path: data/q.jsonl\n", "  path: data/q.jsonl\n  filter: len(q <\n"), 5,
     "input.filter", "not a Python expression", "e.g. len(question) < 500"),
    (BASE.replace("  path: data/q.jsonl\n", "  path: data/q.jsonl\n  limit: 0\n"), 5,
     "input.limit", "must be >= 1, got 0", "an integer >= 1"),
    (BASE + "sampling:\n  max_new_tokens: 8\n  top_p: 2\n", 10, "sampling.top_p",
     "top_p must be in (0, 1], got 2", "change or remove sampling.top_p"),
    (BASE + "sampling: {n: 2}\n", 8, "sampling.n", "n must be 1 in a job", "change or remove"),
    (BASE + "sampling: {stop_regex: x}\n", 8, "sampling.stop_regex", "not supported",
     "change or remove"),
    (BASE + "sampling:\n  max_new_tokens: 8\n  min_new_tokens: 9\n", 10,
     "sampling.min_new_tokens", "[0, max_new_tokens]", "change or remove"),
    (BASE + "sampling: {stop: 5}\n", 8, "sampling.stop",
     "expected str | list[str] | None, got 5", "write str | list[str] | None"),
    (BASE.replace("model_path: smollm2-135m-instruct", "model_path: m\n  dtype: float8"), 3,
     "model.dtype", "dtype='float8' is not one of", "change or remove model.dtype"),
    (BASE.replace('prompt: "Q: {question}\\nA:"', "program: prompts.py"), 5, "program",
     "is not 'path/to/module.py:function'", "program: prompts.py:build"),
    (BASE.replace('prompt: "Q: {question}\\nA:"', "program: nope.py:build"), 5, "program",
     "no file 'nope.py'", "check the path"),
    (BASE.replace("Q: {question}", "Q: {}"), 5, "prompt", "positional field {}",
     "write literal braces as {{ and }}"),
    (BASE.replace("Q: {question}", "Q: {question"), 5, "prompt", "not a valid template",
     "name columns as {column}"),
    (BASE.replace('prompt: "Q: {question}\\nA:"', "messages:\n  - {role: user}"), 6,
     "messages[0].content", "missing required field", "add `content: "),
    (BASE.replace('prompt: "Q: {question}\\nA:"', "messages:\n  - {role: user, text: hi}"),
     6, "messages[0].text", "unknown key 'text'", "valid keys: content, role"),
    (BASE + "  keep_columns: [a, 3]\n", 8, "output.keep_columns[1]",
     "expected a column name, got 3", "list column names"),
    (BASE + "window: 5\nwindow: 6\n", 9, "window", "duplicate key, first at line 8",
     "keep one of them"),
]


@pytest.mark.parametrize(("text", "line", "key", "what", "fix"), ERRORS,
                         ids=[f"{case[2]}-{i}" for i, case in enumerate(ERRORS)])
def test_errors_name_line_key_and_fix(job_dir: Path, text: str, line: int, key: str,
                                      what: str, fix: str) -> None:
    got_what, got_fix = spec_error(write(job_dir, text), line, key)
    assert what in got_what and fix in got_fix, (got_what, got_fix)


def test_errors_in_several_jobs_point_at_the_job_or_the_defaults(job_dir: Path) -> None:
    head = """\
        defaults:
          model: {model_path: m}
          prompt: "{q}"
          order: input
        jobs:
          - input: {path: data/q.jsonl}
            output: {path: a.jsonl}
        """
    cases = [
        ("  - input: {path: data/nope.jsonl}\n    output: {path: b.jsonl}\n", 8,
         "jobs[1].input.path", "no file matches"),
        ("  - input: {path: data/q.jsonl}\n    output: {path: a.jsonl}\n", 9,
         "jobs[1].output.path", "is also the output.path of jobs[0]"),
        ("  - input: {path: data/q.jsonl}\n    output: {path: b.jsonl}\n    nme: x\n", 10,
         "jobs[1].nme", "unknown key 'nme'"),
    ]
    for tail, line, key, what in cases:
        assert what in spec_error(write(job_dir, textwrap.dedent(head) + tail), line, key)[0]
    bad_default = textwrap.dedent(head).replace("order: input", "order: random")
    what, _ = spec_error(write(job_dir, bad_default), 4, "defaults.order")
    assert "'random' is not one of" in what


def test_file_level_errors(job_dir: Path) -> None:
    cases = [
        ("jobs: []\n", 1, "jobs: the list is empty (fix: add at least one job)"),
        ("prompt: x\njobs:\n  - {}\n", 1, "prompt: job fields go inside each entry of `jobs:`"),
        ("jobs:\n  - 3\n", 2, "jobs[0]: expected a job (a mapping), got 3"),
        ("- a\n- b\n", 1, "(top level): expected a job (a mapping) or `jobs:`"),
        ("", 1, "(top level): expected a job"),
        ("model: [\n", 2, "not valid YAML"),
    ]
    for text, line, message in cases:
        path = write(job_dir, text)
        with pytest.raises(SpecError) as e:
            load_jobs(path)
        assert str(e.value).startswith(f"{path}:{line}: {message}"), str(e.value)
        assert "(fix: " in str(e.value)
    with pytest.raises(SpecError, match="cannot read the job file"):
        load_jobs(job_dir / "missing.yaml")
