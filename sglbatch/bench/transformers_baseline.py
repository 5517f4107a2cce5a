"""The peer every number is compared with: transformers `generate` on the same requests."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sglbatch.bench.datasets import BenchRequest


def run_transformers_generate(model_dir: Path, dtype: torch.dtype, requests: list[BenchRequest],
                              batch_size: int) -> tuple[float, int]:
    """Greedy, batched with left padding, each batch generating exactly its longest requested
    output (min_new_tokens = max_new_tokens, the equivalent of ignore_eos). Returns
    (seconds, output tokens requested), counting only the tokens each request asked for."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    pad_id = model.generation_config.pad_token_id or model.config.eos_token_id or 0
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        batch = requests[i:i + batch_size]
        width = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, req in enumerate(batch):
            ids[row, width - len(req.input_ids):] = torch.tensor(req.input_ids)
            mask[row, width - len(req.input_ids):] = 1
        new = max(r.output_len for r in batch)
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=pad_id)
    return time.perf_counter() - start, sum(r.output_len for r in requests)
