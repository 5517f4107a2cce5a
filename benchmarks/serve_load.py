"""Serving under concurrent clients (issue #6's report): requests/s, output tokens/s and
time to first token of streaming chat requests against a running `sglbatch serve`.

    sglbatch serve --port 30000 &
    python benchmarks/serve_load.py --url http://127.0.0.1:30000 --clients 32 --requests 4

Each client sends its requests one after another (streaming, max_tokens fixed, ignore_eos so
every request generates exactly that many tokens); TTFT is measured at the first content
chunk, as a user sees it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import openai

TOPICS = ["the sea", "a city at night", "a robot", "autumn", "a library", "the moon",
          "a train journey", "a garden"]


async def one_client(client: openai.AsyncOpenAI, model: str, i: int, args) -> list[dict]:
    results = []
    for j in range(args.requests):
        start = time.perf_counter()
        ttft = None
        tokens = 0
        stream = await client.chat.completions.create(
            model=model, max_tokens=args.max_tokens, temperature=0.7, seed=i * 1000 + j,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Write about {TOPICS[(i + j) % len(TOPICS)]}."}])
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        results.append({"ttft": ttft, "latency": time.perf_counter() - start, "tokens": tokens})
    return results


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    async with openai.AsyncOpenAI(base_url=args.url + "/v1", api_key=args.api_key,
                                  max_retries=0, timeout=3600) as client:
        model = (await client.models.list()).data[0].id
        start = time.perf_counter()
        per_client = await asyncio.gather(*(one_client(client, model, i, args)
                                            for i in range(args.clients)))
        elapsed = time.perf_counter() - start
    results = [r for rs in per_client for r in rs]
    ttfts = sorted(r["ttft"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    print(json.dumps({
        "clients": args.clients, "requests": len(results), "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(len(results) / elapsed, 3),
        "output_tokens_per_s": round(tokens / elapsed, 1),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 3),
        "latency_p50_s": round(statistics.median(r["latency"] for r in results), 3),
    }, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
