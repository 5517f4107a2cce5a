"""The peer every number is compared with: transformers `generate` on the same requests."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sglbatch.bench.datasets import BenchRequest


def run_transformers_generate(model_dir: Path, dtype: torch.dtype, requests: list[BenchRequest],
                              batch_size: int) -> tuple[float, int]:
    """Greedy, batched with left padding. Fixed-length workloads (ignore_eos) generate each
    batch's longest requested output (min_new_tokens = max_new_tokens) and count only the
    tokens each request asked for; workloads with stop strings stop each sequence there and
    count what it generated. Returns (seconds, output tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    pad_id = model.generation_config.pad_token_id or model.config.eos_token_id or 0
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    fixed_length = requests[0].ignore_eos
    output_tokens = 0
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
        kwargs: dict = {"min_new_tokens": new} if fixed_length else {
            "stop_strings": list(batch[0].stop), "tokenizer": tokenizer}
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                 pad_token_id=pad_id, **kwargs)
        if fixed_length:
            output_tokens += sum(r.output_len for r in batch)
        else:  # finished sequences are padded to the batch's length
            output_tokens += int((out[:, width:] != pad_id).sum())
    return time.perf_counter() - start, output_tokens
