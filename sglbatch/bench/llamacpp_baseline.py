"""llama.cpp through its Python API (llama-cpp-python) on the same GGUF and token ids.
Its high-level API runs one sequence at a time; it keeps the previous prompt's KV and reuses
the longest common prefix, which is what serves shared few-shot prefixes there."""

from __future__ import annotations

import time
from pathlib import Path

from sglbatch.bench.datasets import BenchRequest


def run_llamacpp(gguf_path: Path, requests: list[BenchRequest], n_threads: int = 2
                 ) -> tuple[float, int]:
    """Greedy; fixed-length requests generate exactly output_len tokens (EOS ignored),
    requests with stop strings stop there. Returns (seconds, output tokens)."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ValueError("--baseline llama-cpp needs `pip install llama-cpp-python`") from e
    context = max(len(r.input_ids) + r.output_len for r in requests) + 8
    llm = Llama(model_path=str(gguf_path), n_ctx=context, n_threads=n_threads,
                n_threads_batch=n_threads, n_batch=512, verbose=False)
    output_tokens = 0
    start = time.perf_counter()
    for req in requests:
        if req.ignore_eos:
            for n, _ in enumerate(llm.generate(req.input_ids, temp=0.0, top_k=1,
                                               repeat_penalty=1.0), start=1):
                if n == req.output_len:
                    break
            output_tokens += req.output_len
        else:
            out = llm.create_completion(req.input_ids, max_tokens=req.output_len,
                                        temperature=0.0, top_k=1, repeat_penalty=1.0,
                                        stop=list(req.stop))
            output_tokens += out["usage"]["completion_tokens"]
    return time.perf_counter() - start, output_tokens
