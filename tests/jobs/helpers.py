"""Writing job files and reading outputs back, for the job-runner tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
QUICKSTART_ROWS = [json.loads(line) for line in
                   (REPO / "datasets" / "quickstart.jsonl").read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_job(path: Path, model_dir: Path, **job: Any) -> Path:
    """A job file on the default model in fp32 (greedy text is then batch-invariant)."""
    spec = {"model": {"model_path": str(model_dir), "dtype": "float32", "kv_cache_gb": 0.5},
            "sampling": {"temperature": 0, "max_new_tokens": 12}, **job}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def write_prompt_job(tmp_path: Path, model_dir: Path, rows: list[dict[str, Any]],
                     **job: Any) -> Path:
    """The usual test job: `rows` as in.jsonl (ids in `id`), a Q/A prompt over `question`,
    out.jsonl in input order; `job` adds or replaces fields."""
    spec = {"input": {"path": str(write_jsonl(tmp_path / "in.jsonl", rows)), "id_column": "id"},
            "prompt": "Q: {question}\nA:",
            "output": {"path": str(tmp_path / "out.jsonl"), "sort_output": True}, **job}
    return write_job(tmp_path / "job.yaml", model_dir, **spec)


def read_output(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    return [json.loads(line) for line in path.read_text().splitlines()]
