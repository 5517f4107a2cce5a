"""`sglbatch profile -- <subcommand>`: a Chrome trace with the sglbatch.* ranges around the
aten ops, from the main thread (bench one-batch) and from the engine's thread (bench offline)."""

from __future__ import annotations

import json
from pathlib import Path

from sglbatch.cli import main

MATMULS = {"aten::mm", "aten::linear", "aten::addmm", "aten::matmul", "aten::bmm",
           "mkldnn::_linear_pointwise", "sglbatch.linear"}


def trace_names(path: Path) -> set[str]:
    with path.open() as f:
        trace = json.load(f)
    return {event.get("name") for event in trace["traceEvents"]}


def _only_trace(directory: Path) -> Path:
    traces = list(directory.glob("*.trace.json"))
    assert len(traces) == 1, traces
    return traces[0]


def test_profile_bench_one_batch_writes_a_trace_with_ranges(smollm2_dir, tmp_path, capsys):
    assert main(["profile", "--output-dir", str(tmp_path / "traces"), "--record-shapes", "--",
                 "bench", "one-batch", "--model-path", str(smollm2_dir), "--dtype", "float32",
                 "--kv-cache-gb", "0.05", "--batch-size", "2", "--input-len", "8",
                 "--output-len", "3"]) == 0
    path = _only_trace(tmp_path / "traces")
    assert path.name.startswith("sglbatch-bench-one-batch-")
    names = trace_names(path)
    for name in ("sglbatch.forward_extend", "sglbatch.forward_decode", "sglbatch.sample",
                 "sglbatch.layer.0", "sglbatch.layer.29", "sglbatch.attention", "sglbatch.mlp"):
        assert name in names, name
    assert names & MATMULS and any(n.startswith("aten::") for n in names if n)
    printed = capsys.readouterr().out
    assert f"trace written to {path}" in printed
    assert "top ops by self CPU time" in printed


def test_profile_captures_the_engine_thread(smollm2_dir, tmp_path):
    assert main(["profile", "--output-dir", str(tmp_path), "--", "bench", "offline",
                 "--model-path", str(smollm2_dir), "--kv-cache-gb", "0.05",
                 "--num-prompts", "2", "--random-input-len", "8",
                 "--random-output-len", "3"]) == 0
    names = trace_names(_only_trace(tmp_path))
    for name in ("sglbatch.schedule", "sglbatch.forward_extend", "sglbatch.forward_decode",
                 "sglbatch.process_output", "sglbatch.layer.0"):
        assert name in names, name


def test_profile_needs_a_subcommand(capsys):
    assert main(["profile", "--"]) == 2
    assert "give the subcommand" in capsys.readouterr().err
    assert main(["profile", "--", "profile", "--", "bench"]) == 2
