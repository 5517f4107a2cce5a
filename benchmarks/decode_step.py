"""Batched decode throughput against the machine's compute ceiling (issue #3's decode target).

Fills the engine with N requests of 128-192 random prompt tokens, prefills them, then times
decode steps alone (every request running) and compares tokens/s with the ceiling measured in
the same run: a bf16 matmul's FLOP/s over the model's FLOPs per token.

    python benchmarks/decode_step.py --batch 64 [--attention-backend cpu|torch]
"""

from __future__ import annotations

import argparse
import random
import time

from sglbatch.bench.ceiling import decode_ceiling
from sglbatch.engine.engine import Engine
from sglbatch.engine.layers.linear import model_flops_per_token
from sglbatch.engine.request import Req
from sglbatch.engine.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--attention-backend", default="auto")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    engine = Engine(dtype=args.dtype, attention_backend=args.attention_backend)
    # Drive the scheduler by hand on this thread, with the engine's own thread stopped.
    engine.shutdown()
    scheduler, runner = engine.scheduler, engine.model_runner
    rng = random.Random(0)
    for i in range(args.batch):
        prompt = [rng.randrange(100, 49000) for _ in range(rng.randint(128, 192))]
        scheduler.add_request(Req(str(i), prompt, SamplingParams(
            temperature=0, max_new_tokens=args.steps + 10, ignore_eos=True)))

    def step():
        batch = scheduler.schedule()
        launched = runner.launch(batch)
        scheduler.on_launched(batch, launched.placeholders)
        scheduler.process_output(batch, launched.result())
        return batch

    while scheduler.waiting or scheduler.chunked_req:
        step()
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = step()
    seconds = (time.perf_counter() - start) / args.steps
    assert len(batch.reqs) == args.batch, "not every request was decoding"
    tokens_per_s = args.batch / seconds
    ceiling = decode_ceiling(model_flops_per_token(runner.model), runner.dtype)
    print(f"backend {runner.attn_backend.__class__.__name__}, batch {args.batch}: "
          f"{seconds * 1e3:.1f} ms per decode step, {tokens_per_s:.0f} tok/s; ceiling "
          f"{ceiling['ceiling_tokens_per_s']:.0f} tok/s ({ceiling['matmul_gflops']:.0f} GFLOP/s / "
          f"{ceiling['model_mflops_per_token']:.0f} MFLOP per token): "
          f"{tokens_per_s / ceiling['ceiling_tokens_per_s']:.1%} of the ceiling")


if __name__ == "__main__":
    main()
