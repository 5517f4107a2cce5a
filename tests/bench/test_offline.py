"""`sglbatch bench offline` on the default model at small sizes: it runs and its numbers add up."""

from __future__ import annotations

import json

import pytest

from sglbatch.bench.datasets import random_requests
from sglbatch.cli import main
from tests.conftest import SHARED_GSM8K


def test_random_requests_respect_lengths_and_seed():
    reqs = random_requests(50, input_len=40, output_len=10, range_ratio=0.5, vocab_size=1000,
                           seed=3)
    assert all(20 <= len(r.input_ids) <= 40 and 5 <= r.output_len <= 10 for r in reqs)
    assert all(100 <= t < 1000 for r in reqs for t in r.input_ids)
    assert reqs == random_requests(50, 40, 10, 0.5, 1000, seed=3)
    with pytest.raises(ValueError, match="random-range-ratio"):
        random_requests(1, 4, 4, 1.5, 1000, 0)


def test_bench_offline_with_transformers_baseline_writes_consistent_record(smollm2_dir, tmp_path):
    out = tmp_path / "bench.jsonl"
    args = ["bench", "offline", "--model-path", str(smollm2_dir), "--dtype", "float32",
            "--num-prompts", "6", "--random-input-len", "24", "--random-output-len", "6",
            "--random-range-ratio", "0.5", "--baseline", "transformers",
            "--baseline-batch-sizes", "3,6", "--output-file", str(out)]
    assert main(args) == 0
    assert main(args) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2  # appended, not overwritten
    rec = records[0]
    expected = random_requests(6, 24, 6, 0.5, 49152, seed=1)
    assert rec["completed"] == 6
    assert rec["total_output_tokens"] == sum(r.output_len for r in expected)
    assert rec["total_input_tokens"] == sum(len(r.input_ids) for r in expected)
    assert rec["output_throughput"] * rec["duration"] == pytest.approx(rec["total_output_tokens"])
    assert rec["baseline"]["best_batch_size"] in (3, 6)
    assert rec["baseline"]["device"] == rec["device"]  # the peer runs on the engine's device
    assert rec["speedup_vs_baseline"] == pytest.approx(
        rec["output_throughput"] / rec["baseline"]["output_throughput"])
    assert records[1]["total_output_tokens"] == rec["total_output_tokens"]  # same seed, same work
    # The steps by batch size account for every computed token: each request's first output
    # token comes from its prefill step, every later one from a decode step.
    steps = rec["steps_by_batch_size"]
    assert steps[0]["mode"] == "extend" and all(s["mode"] == "decode" for s in steps[1:])
    assert steps[0]["tokens"] == rec["total_input_tokens"]  # nothing cached: a flushed cache
    assert sum(s["tokens"] for s in steps[1:]) == rec["total_output_tokens"] - 6
    assert sum(s["steps"] for s in steps[1:]) >= max(r.output_len for r in expected) - 1
    assert 0 < sum(s["seconds"] for s in steps) <= rec["duration"]


def test_iter_json_array_stops_cleanly_at_a_truncated_record():
    import io

    from sglbatch.bench.datasets import iter_json_array

    text = json.dumps([{"a": i, "s": "x" * 50} for i in range(100)])
    assert [r["a"] for r in iter_json_array(io.StringIO(text), chunk_chars=64)] == list(range(100))
    cut = text[:text.index('{"a": 57')] + '{"a": 57, "s": "xx'
    assert [r["a"] for r in iter_json_array(io.StringIO(cut), chunk_chars=64)] == list(range(57))


@pytest.mark.parametrize("dataset_args", [
    pytest.param(["--dataset-name", "sharegpt", "--num-prompts", "4", "--sharegpt-output-len",
                  "4", "--sharegpt-context-len", "128"], id="sharegpt"),
    pytest.param(["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "2",
                  "--gsp-prompts-per-group", "3", "--gsp-system-prompt-len", "64",
                  "--gsp-question-len", "8", "--gsp-output-len", "4"],
                 id="generated-shared-prefix"),
    pytest.param(["--dataset-name", "gsm8k", "--dataset-path", str(SHARED_GSM8K),
                  "--num-prompts", "3", "--num-shots", "2", "--gsm8k-output-len", "24"],
                 id="gsm8k"),
])
def test_bench_offline_datasets(smollm2_dir, tmp_path, dataset_args):
    out = tmp_path / "bench.jsonl"
    assert main(["bench", "offline", "--model-path", str(smollm2_dir), "--output-file", str(out),
                 *dataset_args]) == 0
    rec = json.loads(out.read_text())
    assert rec["dataset_name"] == dataset_args[1]
    assert rec["completed"] == {"sharegpt": 4, "generated-shared-prefix": 6, "gsm8k": 3}[
        rec["dataset_name"]]
    assert rec["output_throughput"] > 0 and rec["total_output_tokens"] > 0
    if rec["dataset_name"] == "generated-shared-prefix":
        # 6 prompts in 2 groups: at least 4 of them find their 64-token system prompt cached.
        assert rec["cache_hit_rate"] >= 4 * 64 / rec["total_input_tokens"]
    if rec["dataset_name"] == "gsm8k":
        assert rec["cache_hit_rate"] > 0.3  # the 2-shot prefix is shared
        assert rec["total_output_tokens"] <= 3 * 24


def test_bench_offline_breakdown_and_mfu(smollm2_dir, tmp_path, monkeypatch):
    from sglbatch.bench.breakdown import CATEGORIES

    monkeypatch.setenv("SGLBATCH_TORCH_PROFILER_DIR", str(tmp_path / "traces"))
    out = tmp_path / "bench.jsonl"
    assert main(["bench", "offline", "--model-path", str(smollm2_dir), "--kv-cache-gb", "0.05",
                 "--num-prompts", "3", "--random-input-len", "16", "--random-output-len", "3",
                 "--breakdown", "--breakdown-steps", "2", "--output-file", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert 0 < rec["mfu"] <= 1
    breakdown = rec["breakdown"]
    assert breakdown["steps"] == 2  # a prefill and a decode step, of 3
    assert set(breakdown["shares"]) == set(CATEGORIES)
    assert sum(breakdown["shares"].values()) == pytest.approx(1.0)
    assert all(share > 0 for share in breakdown["shares"].values()), breakdown["shares"]
    assert sum(breakdown["ms_per_step"].values()) == pytest.approx(breakdown["step_ms"])


def test_breakdown_counts_the_cpu_elementwise_kernels_as_model_ops(tmp_path):
    """The fused norm and rope kernels are C++ calls the profiler sees only through their
    range: their time is a model op's, not Python between ops."""
    from sglbatch.bench.breakdown import step_breakdown
    from sglbatch.engine.layers.fused_cpu import TRACE_NAME

    def event(name, ts, dur, cat="user_annotation"):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": 1}

    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": [
        event("sglbatch.step", 0, 100), event("sglbatch.forward_decode", 10, 80),
        event(TRACE_NAME, 20, 30), event("aten::mm", 60, 20, "cpu_op")]}))
    ms = step_breakdown(trace)["ms_per_step"]
    assert ms["other_model_ops"] == pytest.approx(0.030)
    assert ms["linear"] == pytest.approx(0.020)
    assert ms["python"] == pytest.approx(0.050)  # the step's and the forward's own time
