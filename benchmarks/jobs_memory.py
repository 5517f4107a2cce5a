"""Peak memory of `sglbatch run`'s row path on a 1,000,000-row input (issue #4).

Writes a JSONL of tiny prompts, then runs the real JobRunner (reader, rendering,
tokenization, prefix ordering per window, chunked atomic writer, finalize with sort) with the
model replaced by an echo that answers instantly, since a million prefills would take hours
on this CPU. Run under /usr/bin/time -v and read "Maximum resident set size":

    /usr/bin/time -v python benchmarks/jobs_memory.py --rows 1000000 --workdir /tmp/jobs-1m
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sglbatch.engine.model_source import resolve_model_path
from sglbatch.engine.tokenizer import Tokenizer
from sglbatch.jobs.runner import JobRunner
from sglbatch.jobs.spec import load_jobs


class EchoEngine:
    """Stands in for the engine: the real tokenizer, an empty answer at once."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    async def async_generate(self, input_ids: list[int], sampling_params: dict) -> dict:
        return {"text": "", "meta_info": {"prompt_tokens": len(input_ids),
                                          "completion_tokens": 0, "cached_tokens": 0,
                                          "finish_reason": {"type": "length"}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sglbatch-jobs-1m"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    data = args.workdir / "input.jsonl"
    if not data.exists() or sum(1 for _ in data.open("rb")) != args.rows:
        with data.open("w") as f:
            for i in range(args.rows):
                f.write(json.dumps({"q": f"What is {i % 997} plus {i % 13}?"}) + "\n")
    job_file = args.workdir / "job.yaml"
    job_file.write_text(
        "model: {model_path: smollm2-135m-instruct}\n"
        f"input: {{path: {data}}}\n"
        "prompt: 'Q: {q}\\nA:'\n"
        "sampling: {max_new_tokens: 1}\n"
        f"output: {{path: {args.workdir / 'out.jsonl'}, mode: overwrite, sort_output: true}}\n")
    [job] = load_jobs(job_file)
    engine = EchoEngine(Tokenizer(resolve_model_path("smollm2-135m-instruct")))
    start = time.perf_counter()
    stats = JobRunner(job, engine).run()
    print(f"{stats.rows} rows in {time.perf_counter() - start:.1f} s, {stats.errors} errors")


if __name__ == "__main__":
    main()
