"""The GPU check: one command for a person with a CUDA GPU, about 10 minutes on one GPU.

    python benchmarks/gpu_check.py [--out gpu_check] [--gsm8k-path ../shared/datasets/gsm8k]

It runs, each step with its own time limit and log under --out:
1. the Triton kernel tests (tests/kernels) on the GPU;
2. the engine's GPU tests (tests/engine/test_gpu.py: greedy vs transformers on CUDA, CUDA
   graphs, torch.compile, the attention backends, FlashInfer where installed);
3. the overlap schedule's tests (tests/engine/test_overlap_schedule.py) on CUDA: outputs
   with it on equal those with it off; then the deterministic-inference and speculative
   decoding tests, whose engines run on CUDA too;
4. `sglbatch bench offline --device cuda --baseline transformers` on random prompts and on
   GSM8K 5-shot: the engine and transformers `generate` on the same GPU, same requests;
   the random workload again with --disable-overlap-schedule (what the overlap gains);
5. tensor parallelism: tp 2 greedy tokens equal tp 1 (NCCL), skipped with one GPU.
It ends in one summary table (also written to --out/summary.json) and exits 1 if a step
failed. Offline once the default model is in $SGLBATCH_CACHE_DIR and GSM8K is on disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = REPO.parent / "shared" / "datasets" / "gsm8k"


@dataclass
class Step:
    name: str
    command: list[str]
    timeout_s: int
    returncode: int | None = None
    seconds: float = 0.0
    result: str = ""
    details: dict = field(default_factory=dict)
    skip_reason: str | None = None  # set: the step is reported, not run


def _pytest(name: str, paths: list[str], out: Path, timeout_s: int) -> Step:
    return Step(name, [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths,
                       f"--junitxml={out / (name + '.xml')}"], timeout_s)


def _bench(name: str, dataset: list[str], out: Path, timeout_s: int, device: str = "cuda",
           baseline_batch_size: int = 128) -> Step:
    return Step(name, [sys.executable, "-m", "sglbatch", "bench", "offline", "--device", device,
                       *dataset, "--baseline", "transformers", "--baseline-batch-sizes",
                       str(baseline_batch_size), "--output-file", str(out / (name + ".jsonl"))],
                timeout_s)


def build_steps(args: argparse.Namespace, gpu_count: int) -> list[Step]:
    out = args.out
    gsm8k = ["--dataset-path", str(args.gsm8k_path)] if args.gsm8k_path else []
    random = ["--dataset-name", "random", "--num-prompts", "256", "--random-input-len", "256",
              "--random-output-len", "128"]
    tp = _pytest("tensor parallel tp 2", ["-m", "gpu", "tests/engine/parallel/test_gpu_tp.py"],
                 out, 240)
    if gpu_count < 2:
        tp.skip_reason = f"skipped: {gpu_count} GPU visible, tp 2 needs two"
    return [
        _pytest("kernel tests", ["tests/kernels"], out, 150),
        _pytest("engine GPU tests", ["-m", "gpu", "tests/engine/test_gpu.py"], out, 240),
        _pytest("overlap schedule", ["tests/engine/test_overlap_schedule.py"], out, 150),
        # Engines there pick CUDA: batch-invariant greedy tokens (issue #20), and NGRAM verify
        # steps equal to plain decoding.
        _pytest("deterministic inference", ["tests/engine/test_deterministic.py"], out, 150),
        _pytest("speculative decoding", ["tests/engine/test_speculative.py"], out, 150),
        _bench("bench random", random, out, 120),
        _bench("bench random, no overlap", [*random, "--disable-overlap-schedule"], out, 120),
        _bench("bench gsm8k", ["--dataset-name", "gsm8k", "--num-prompts", "128", *gsm8k],
               out, 120),
        tp,
    ]


def run_step(step: Step, out: Path) -> None:
    if step.skip_reason is not None:
        step.returncode, step.result = 0, step.skip_reason
        return
    log = out / (step.name.replace(" ", "_") + ".log")
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            step.returncode = subprocess.run(step.command, cwd=REPO, stdout=f,
                                             stderr=subprocess.STDOUT,
                                             timeout=step.timeout_s).returncode
        except subprocess.TimeoutExpired:
            step.returncode = None
    step.seconds = time.perf_counter() - start
    step.details["log"] = str(log)
    junit = out / (step.name + ".xml")
    bench = out / (step.name + ".jsonl")
    if step.returncode is None:
        step.result = f"timed out after {step.timeout_s}s"
    elif junit.exists():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite[0]
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        step.details.update(counts)
        passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        step.result = (f"{passed} passed, {counts['failures'] + counts['errors']} failed, "
                       f"{counts['skipped']} skipped")
    elif bench.exists() and step.returncode == 0:
        record = json.loads(bench.read_text().splitlines()[-1])
        base = record["baseline"]
        step.details.update(record)
        step.result = (f"{record['output_throughput']:,.0f} vs {base['output_throughput']:,.0f} "
                       f"output tok/s (transformers on {base['device']}, batch "
                       f"{base['best_batch_size']}): {record['speedup_vs_baseline']:.1f}x; "
                       f"cache hit {record['cache_hit_rate']:.0%}")
    else:
        step.result = f"exit {step.returncode} (see {log.name})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check"),
                        help="folder for logs, junit files, bench records and summary.json")
    parser.add_argument("--gsm8k-path", type=Path,
                        default=SHARED_GSM8K if SHARED_GSM8K.is_dir() else None,
                        help="GSM8K folder (train.jsonl, test.jsonl); default: the shared "
                             "copy beside the repo, else a download")
    args = parser.parse_args(argv)
    import torch
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not torch.cuda.is_available():
        console.print("[red]no CUDA GPU is visible: the GPU check needs one[/]")
        return 2
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import flashinfer  # noqa: F401

        flashinfer_state = "installed"
    except ImportError:
        flashinfer_state = "not installed: its tests skip"
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, flashinfer " \
             f"{flashinfer_state}"
    steps = build_steps(args, torch.cuda.device_count())
    for step in steps:
        with console.status(f"{step.name} (at most {step.timeout_s}s)..."):
            run_step(step, args.out)
        console.print(f"{step.name}: {step.result} [{step.seconds:.0f}s]")
    table = Table(title=f"GPU check: {device}")
    for column in ("step", "result", "seconds", "ok"):
        table.add_column(column)
    for step in steps:
        ok = step.returncode == 0
        table.add_row(step.name, step.result, f"{step.seconds:.0f}",
                      "[green]yes[/]" if ok else "[red]no[/]")
    console.print(table)
    summary = {"device": device, "steps": [asdict(s) for s in steps]}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return 0 if all(s.returncode == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
