"""`sglbatch run` on GSM8K 5-shot (issue #4's report): wall time and cached-token share with
`order: prefix` against `order: input`, against transformers `generate` on the same prompts.

    python benchmarks/jobs_gsm8k.py --dataset-path ../shared/datasets/gsm8k --rows 200

Each order runs in a fresh engine (an empty prefix cache). Prompts: the few-shot prefix (from
the train split) + "Question: ...\\nAnswer:"; greedy, max_new_tokens 256, stop "Question".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import yaml

from sglbatch.bench.datasets import BenchRequest
from sglbatch.bench.gsm8k import STOP, few_shot_prefix, load_gsm8k, question_prompt
from sglbatch.bench.transformers_baseline import (
    TransformersGenerator,
    run_transformers_generate,
)
from sglbatch.engine.engine import Engine
from sglbatch.jobs.runner import JobRunner
from sglbatch.jobs.spec import load_jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset-path", required=True)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sglbatch-jobs-gsm8k"))
    parser.add_argument("--baseline-batch-size", type=int, default=64)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    prefix = few_shot_prefix(load_gsm8k("train", args.dataset_path), 5)
    questions = load_gsm8k("test", args.dataset_path)[:args.rows]
    data = args.workdir / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": q["question"]}) + "\n" for q in questions))
    sampling = {"temperature": 0, "max_new_tokens": 256, "stop": STOP}
    results = {}
    for order in ("prefix", "input"):
        job_file = args.workdir / f"job-{order}.yaml"
        job_file.write_text(yaml.safe_dump({
            "model": {"model_path": "smollm2-135m-instruct"},
            "input": {"path": str(data)},
            # The prefix goes in as literal text: braces in it must not read as fields.
            "prompt": prefix.replace("{", "{{").replace("}", "}}")
                      + question_prompt("{question}"),
            "sampling": sampling, "order": order,
            "output": {"path": str(args.workdir / f"out-{order}.jsonl"), "mode": "overwrite"},
        }))
        [job] = load_jobs(job_file)
        with Engine(**job.model) as engine:
            start = time.perf_counter()
            stats = JobRunner(job, engine).run()
            results[order] = (time.perf_counter() - start, stats)
            tokenizer = engine.tokenizer
            model_dir = engine.model_runner.model_dir
            dtype = engine.model_runner.dtype
    requests = [BenchRequest(tokenizer.encode(prefix + question_prompt(q["question"])), 256,
                             stop=tuple(STOP), ignore_eos=False) for q in questions]
    hf_seconds, hf_tokens = run_transformers_generate(TransformersGenerator(model_dir, dtype),
                                                      requests, args.baseline_batch_size)
    print(f"{args.rows} GSM8K questions, 5-shot, {dtype}")
    for order, (seconds, stats) in results.items():
        print(f"  order: {order:6s} {seconds:7.1f} s wall, cached-token share "
              f"{stats.cache_hit_rate:.1%}, {stats.output_tokens} output tokens, "
              f"{stats.errors} errors; transformers / this = {hf_seconds / seconds:.2f}x")
    print(f"  transformers generate (batch {args.baseline_batch_size}): {hf_seconds:.1f} s, "
          f"{hf_tokens} output tokens")
    print(f"  order prefix vs input: {results['input'][0] / results['prefix'][0]:.2f}x")


if __name__ == "__main__":
    main()
