"""`sglbatch bench one-batch` at tiny sizes: one JSONL line per combination, numbers that add
up, combinations that do not fit skipped. (Its --correct mode is compared with transformers in
tests/engine/test_one_batch_correct.py.)"""

from __future__ import annotations

import json

import pytest

from sglbatch.bench.one_batch import synthetic_input_ids
from sglbatch.cli import main


def test_one_batch_appends_one_consistent_line_per_combination(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "one_batch.jsonl"
    out.write_text('{"earlier": "run"}\n')
    # 4 x (8 + 3) = 44 slots do not fit a 40-slot pool: that combination is skipped.
    assert main(["bench", "one-batch", "--model-path", str(smollm2_dir), "--dtype", "float32",
                 "--max-total-tokens", "40", "--batch-size", "1", "4", "--input-len", "8",
                 "--output-len", "1", "3", "--run-name", "tiny",
                 "--result-filename", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0] == {"earlier": "run"}  # appended, not overwritten
    records = lines[1:]
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in records] == [
        (1, 8, 1), (1, 8, 3), (4, 8, 1)]
    for r in records:
        bs, il, ol = r["batch_size"], r["input_len"], r["output_len"]
        assert r["run_name"] == "tiny" and r["dtype"] == "float32"
        assert r["prefill_throughput"] * r["prefill_latency"] == pytest.approx(bs * il)
        assert r["overall_throughput"] * r["total_latency"] == pytest.approx(bs * (il + ol))
        if ol == 1:  # no decode step
            assert "median_decode_latency" not in r
            assert r["total_latency"] == pytest.approx(r["prefill_latency"])
        else:
            assert r["median_decode_throughput"] * r["median_decode_latency"] == \
                pytest.approx(bs)
            assert r["total_latency"] > r["prefill_latency"] + r["median_decode_latency"]
    printed = capsys.readouterr().out
    assert "skipping (batch 4, input 8, output 3)" in printed
    assert "bench one-batch: tiny" in printed


def test_correct_mode_prints_outputs(smollm2_dir, capsys):
    assert main(["bench", "one-batch", "--model-path", str(smollm2_dir), "--dtype", "float32",
                 "--kv-cache-gb", "0.05", "--correct", "--output-len", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("prefill next-token top ids:") == 3
    assert "The capital of France is" in printed


def test_synthetic_inputs_are_seeded():
    a = synthetic_input_ids(3, 5, 49152, seed=7)
    assert a == synthetic_input_ids(3, 5, 49152, seed=7) != synthetic_input_ids(3, 5, 49152, 8)
    assert all(len(row) == 5 and all(0 <= t < 10000 for t in row) for row in a)


def test_missing_prompt_file_names_the_flag(smollm2_dir, capsys):
    assert main(["bench", "one-batch", "--model-path", str(smollm2_dir), "--kv-cache-gb", "0.05",
                 "--correct", "--prompt-filename", "/no/such/prompts.txt"]) == 2
    assert "--prompt-filename /no/such/prompts.txt" in capsys.readouterr().err
