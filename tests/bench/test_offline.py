"""`sglbatch bench offline` on the default model at small sizes: it runs and its numbers add up."""

from __future__ import annotations

import json

import pytest

from sglbatch.bench.datasets import random_requests
from sglbatch.cli import main


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
    assert rec["speedup_vs_baseline"] == pytest.approx(
        rec["output_throughput"] / rec["baseline"]["output_throughput"])
    assert records[1]["total_output_tokens"] == rec["total_output_tokens"]  # same seed, same work
