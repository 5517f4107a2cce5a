"""The GPU check's plumbing, run on the CPU: steps run with their limits and logs, pytest
junit files and bench records become the summary's results, and without a GPU the check
says so instead of running. (The check itself needs a GPU: benchmarks/gpu_check.py.)"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _gpu_check():
    """benchmarks/gpu_check.py, a script rather than a package module, loaded once."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check",
                                                      ROOT / "benchmarks/gpu_check.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_a_pytest_step_reports_its_counts(tmp_path):
    check = _gpu_check()
    tests = tmp_path / "test_sample.py"
    tests.write_text("import pytest\n\ndef test_ok():\n    pass\n\n"
                     "@pytest.mark.skip(reason='x')\ndef test_skipped():\n    pass\n")
    step = check._pytest("sample tests", [str(tests)], tmp_path, 120)
    check.run_step(step, tmp_path)
    assert step.returncode == 0 and step.result == "1 passed, 0 failed, 1 skipped"
    assert Path(step.details["log"]).exists()


def test_a_bench_step_reports_the_ratio_to_transformers_on_the_same_device(tmp_path,
                                                                           smollm2_dir):
    check = _gpu_check()
    step = check._bench("bench random", [
        "--model-path", str(smollm2_dir), "--dataset-name", "random", "--num-prompts", "4",
        "--random-input-len", "16", "--random-output-len", "4", "--kv-cache-gb", "0.1"],
        tmp_path, 300, device="cpu", baseline_batch_size=4)
    check.run_step(step, tmp_path)
    assert step.returncode == 0, Path(step.details["log"]).read_text()[-2000:]
    record = json.loads((tmp_path / "bench random.jsonl").read_text())
    assert "(transformers on cpu, batch 4)" in step.result
    assert f"{record['speedup_vs_baseline']:.1f}x" in step.result


def test_a_step_past_its_limit_is_reported_as_timed_out(tmp_path):
    check = _gpu_check()
    step = check.Step("sleeper", ["sleep", "5"], timeout_s=1)
    check.run_step(step, tmp_path)
    assert step.returncode is None and step.result == "timed out after 1s"


def test_without_a_gpu_the_check_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the check would run")
    assert _gpu_check().main(["--out", "unused"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().out


def test_the_tp2_step_is_skipped_with_one_gpu_and_runs_with_two(tmp_path):
    check = _gpu_check()
    args = check.argparse.Namespace(out=tmp_path, gsm8k_path=None)
    [one] = [s for s in check.build_steps(args, gpu_count=1) if s.name.startswith("tensor")]
    check.run_step(one, tmp_path)
    assert one.returncode == 0 and one.result == "skipped: 1 GPU visible, tp 2 needs two"
    assert not list(tmp_path.glob("*.log"))  # nothing ran
    [two] = [s for s in check.build_steps(args, gpu_count=2) if s.name.startswith("tensor")]
    assert two.skip_reason is None and "tests/engine/parallel/test_gpu_tp.py" in two.command
