"""`sglbatch.ray.SglbatchProcessor`: generation as a stage of a Ray Data pipeline, in the shape
of ray.data.llm's build_processor (preprocess -> engine -> postprocess).

    processor = SglbatchProcessor({"model_path": "smollm2-135m-instruct"},
                                  {"temperature": 0, "max_new_tokens": 64},
                                  prompt="Q: {question}\\nA:", replicas=2)
    ds = processor(ray.data.read_parquet("questions/*.parquet"))

Each row gains `text`, `meta_info` (a JSON string) and `error` (null, or why the row could
not run: a bad row never fails its batch). Rows are rendered and run as `sglbatch run` runs
them; for a resumable, exactly-once run over files use a job with `executor: ray`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data

from sglbatch.engine.sampling_params import SamplingParams
from sglbatch.jobs.ray_executor import JobReplica
from sglbatch.jobs.reader import Row
from sglbatch.jobs.spec import JOB_N_MESSAGE, InputSpec, JobSpec, OutputSpec

_Fn = Callable[[dict[str, Any]], dict[str, Any]]


class _ProcessorReplica(JobReplica):
    """A batch of the dataset's rows in; the same rows out, with text, meta_info and error."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [Row(i, i, data) for i, data in enumerate(batch.to_pylist())]
        records = self.run(rows)
        columns = {"text": [r.get("text") for r in records],
                   "meta_info": [json.dumps(r["meta_info"]) if "meta_info" in r else None
                                 for r in records],
                   "error": [r.get("error") for r in records]}
        for name, values in columns.items():
            batch = batch.append_column(name, pa.array(values, pa.string()))
        return batch


class SglbatchProcessor:
    """`ds = processor(ds)`: each row rendered with `prompt` (a str.format template over its
    columns) or `messages` ({role, content} templates, or the column holding them), run on
    `replicas` Ray actors each owning one `Engine(**engine_args)`. `preprocess` and
    `postprocess` map a row (a dict) before and after."""

    def __init__(self, engine_args: dict[str, Any], sampling: dict[str, Any] | None = None, *,
                 prompt: str | None = None, messages: str | list[dict[str, str]] | None = None,
                 preprocess: _Fn | None = None, postprocess: _Fn | None = None,
                 replicas: int = 1, batch_size: int = 64, num_cpus_per_replica: float = 1,
                 num_gpus_per_replica: float = 0, max_inflight: int = 256):
        if (prompt is None) == (messages is None):
            raise ValueError("SglbatchProcessor: give exactly one of prompt= or messages=")
        SamplingParams(**(sampling or {})).verify()
        if (sampling or {}).get("n", 1) != 1:
            raise ValueError(f"SglbatchProcessor: {JOB_N_MESSAGE}")
        self.job = JobSpec(name="processor", model=dict(engine_args), prompt=prompt,
                           messages=messages, sampling=dict(sampling or {}),
                           input=InputSpec(paths=[], format="jsonl"),
                           output=OutputSpec(path=Path(), format="jsonl"),
                           max_inflight=max_inflight)
        self.preprocess, self.postprocess = preprocess, postprocess
        self.replicas, self.batch_size = replicas, batch_size
        self.num_cpus, self.num_gpus = num_cpus_per_replica, num_gpus_per_replica

    def __call__(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        ds = ds.map_batches(
            _ProcessorReplica, fn_constructor_kwargs={"job": self.job}, batch_format="pyarrow",
            batch_size=self.batch_size, compute=ray.data.ActorPoolStrategy(size=self.replicas),
            num_cpus=self.num_cpus, num_gpus=self.num_gpus)
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        return ds
