"""`sglbatch bench step-cost` at tiny sizes, and the trace breakdown's attribution rules."""

from __future__ import annotations

import json

import pytest

from sglbatch.bench.breakdown import step_breakdown
from sglbatch.bench.step_cost import PHASES
from sglbatch.cli import main


def _event(name: str, ts: float, dur: float, cat: str = "cpu_op") -> dict:
    return {"ph": "X", "cat": cat, "name": name, "pid": 1, "tid": 2, "ts": ts, "dur": dur}


def test_breakdown_attributes_self_time_by_phase_and_outermost_op(tmp_path):
    ann = "user_annotation"
    events = [
        _event("sglbatch.step", 0, 100, ann),
        _event("sglbatch.schedule", 1, 9, ann),
        _event("sglbatch.forward_decode", 10, 60, ann),
        _event("aten::linear", 11, 10), _event("aten::addmm", 12, 8),  # all of it linear
        _event("aten::index", 22, 3),
        _event("aten::rms_norm", 25, 5),
        _event("sglbatch.attention_backend", 30, 30, ann),
        _event("aten::index_put_", 31, 4), _event("aten::bmm", 40, 10),  # bmm: attention
        _event("sglbatch.linear", 61, 6, ann), _event("aten::empty", 62, 1),  # the CPU kernel
        _event("sglbatch.sample", 70, 20, ann), _event("aten::argmax", 71, 15),
        _event("sglbatch.wait_device", 91, 4, ann), _event("aten::item", 92, 2),
        _event("sglbatch.step", 200, 50, ann),  # a prefill step: no decode forward
        _event("sglbatch.forward_extend", 201, 40, ann),
    ]
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": events}))
    ms = {k: v * 1e3 for k, v in step_breakdown(path, decode_only=True)["ms_per_step"].items()}
    assert ms == pytest.approx({
        "linear": 10 + 6, "attention": 26, "gathers_kv_writes": 3 + 4, "other_model_ops": 5,
        "sampling": 20, "prepare": 0, "schedule": 9, "output_processing": 0, "device_wait": 4,
        # the forward's time between ops (60 - 10 - 3 - 5 - 30 - 6) and the step's own
        "python": 6 + 100 - 9 - 60 - 20 - 4})
    assert step_breakdown(path)["steps"] == 2


def test_bench_step_cost_tiny(smollm2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SGLBATCH_TORCH_PROFILER_DIR", str(tmp_path / "traces"))
    out = tmp_path / "cost.jsonl"
    assert main(["bench", "step-cost", "--model-path", str(smollm2_dir), "--kv-cache-gb", "0.05",
                 "--batch-size", "1", "3", "--input-len", "4", "--decode-steps", "4",
                 "--profile-steps", "3", "--output-file", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch_size"] for r in records] == [1, 3]
    for r in records:
        assert r["decode_steps"] == 4
        assert 0 < r["noop_forward_ms"] < r["step_ms"]
        assert r["engine_ms"] == pytest.approx(r["step_ms"] - r["noop_forward_ms"])
        profiled = r["profiled"]
        assert profiled["steps"] == 3
        assert profiled["ms_per_step"]["linear"] == 0  # the model is gone
        assert all(profiled["ms_per_step"][phase] > 0 for phase in PHASES)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_simulated_device_makes_steps_last_at_least_its_time(smollm2_dir, tmp_path,
                                                               monkeypatch, overlap):
    monkeypatch.setenv("SGLBATCH_TORCH_PROFILER_DIR", str(tmp_path / "traces"))
    out = tmp_path / "cost.jsonl"
    flags = [] if overlap else ["--disable-overlap-schedule"]
    assert main(["bench", "step-cost", "--model-path", str(smollm2_dir), "--kv-cache-gb", "0.05",
                 "--batch-size", "2", "--input-len", "4", "--decode-steps", "4",
                 "--profile-steps", "2", "--device-ms", "5", "--output-file", str(out),
                 *flags]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    # The device runs one step per 5 ms, so steps cannot be much shorter (the overlap
    # schedule's step boundaries fall a little off the device's).
    assert record["device_ms"] == 5 and record["step_ms"] >= 4.5
    assert record["engine_ms"] == pytest.approx(
        record["step_ms"] - record["noop_forward_ms"] - 5)
    # The sleep is spent reading the launched step's tokens.
    assert record["profiled"]["ms_per_step"]["device_wait"] > 2


@pytest.mark.parametrize("args", [["bench", "step-cost", "--batch-size", "1", "0"],
                                  ["bench", "step-cost", "--decode-steps", "0"],
                                  ["bench", "offline", "--breakdown-steps", "0"]])
def test_counts_below_one_are_refused_naming_the_option(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    option = args[2]
    assert f"Invalid value for '{option}'" in capsys.readouterr().err
