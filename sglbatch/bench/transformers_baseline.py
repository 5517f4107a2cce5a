"""The peer every number is compared with: transformers `generate` on the same requests."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from sglbatch.bench.datasets import BenchRequest


class TransformersGenerator:
    """Greedy transformers `generate`, batched with left padding, on `device` (the engine's,
    so the two are compared on the same hardware)."""

    def __init__(self, model_dir: Path, dtype: torch.dtype, device: str | torch.device):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        pad_id = self.model.generation_config.pad_token_id or self.model.config.eos_token_id or 0
        self.pad_id = pad_id[0] if isinstance(pad_id, list) else pad_id

    def generate(self, batch: list[BenchRequest]) -> list[list[int]]:
        """Each request's new token ids. Fixed-length workloads (ignore_eos) generate the
        batch's longest requested output and keep the tokens each request asked for;
        workloads with stop strings stop each sequence there (its ids end with the tokens
        that completed the stop string, or EOS)."""
        width = max(len(r.input_ids) for r in batch)
        padding = [width - len(r.input_ids) for r in batch]
        ids = torch.tensor([[self.pad_id] * pad + r.input_ids for pad, r in zip(padding, batch)],
                           dtype=torch.long, device=self.device)
        mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in padding],
                            device=self.device)
        new = max(r.output_len for r in batch)
        fixed_length = batch[0].ignore_eos
        kwargs: dict[str, Any] = {"min_new_tokens": new} if fixed_length else {
            "stop_strings": list(batch[0].stop), "tokenizer": self.tokenizer}
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=new, pad_token_id=self.pad_id, **kwargs)
        new_ids = out[:, width:].tolist()
        if fixed_length:
            return [row[:req.output_len] for row, req in zip(new_ids, batch)]
        return [_until_finished(row, self.pad_id, self.model.generation_config.eos_token_id)
                for row in new_ids]

    def generate_all(self, requests: list[BenchRequest], batch_size: int
                     ) -> Iterator[tuple[list[int], list[list[int]]]]:
        """(indices into `requests`, their new token ids) per batch. Requests are batched by
        prompt length, so left padding stays short."""
        order = sorted(range(len(requests)), key=lambda i: len(requests[i].input_ids))
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            yield indices, self.generate([requests[i] for i in indices])


def _until_finished(ids: list[int], pad_id: int, eos: int | list[int] | None) -> list[int]:
    """A finished sequence is followed by padding; with pad == EOS the first EOS ends it."""
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    for n, token in enumerate(ids):
        if token in eos_ids:
            return ids[:n + 1]
        if token == pad_id:
            return ids[:n]
    return ids


def run_transformers_generate(generator: TransformersGenerator, requests: list[BenchRequest],
                              batch_size: int) -> tuple[float, int]:
    """Greedy, batched with left padding, in the requests' order. Returns
    (seconds, output tokens)."""
    output_tokens = 0
    start = time.perf_counter()
    for i in range(0, len(requests), batch_size):
        output_tokens += sum(map(len, generator.generate(requests[i:i + batch_size])))
    return time.perf_counter() - start, output_tokens
