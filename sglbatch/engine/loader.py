"""Streams (name, tensor) pairs out of a model directory's safetensors into the model,
merging separate q/k/v and gate/up checkpoint tensors into the fused parameters. A
tensor-parallel rank's model takes only its shard of each tensor (`model.shard`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sglbatch.engine.parallel.shard import RankShard

logger = logging.getLogger(__name__)


def iter_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights found")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _shard_rows(param: nn.Parameter, shard: str | int, rank_shard: RankShard) -> slice:
    """Rows of a fused weight that one checkpoint tensor (this rank's part of it) fills."""
    if shard in ("q", "k", "v"):
        q = rank_shard.num_q_heads * rank_shard.head_dim
        kv = rank_shard.num_kv_heads * rank_shard.head_dim
        start = {"q": 0, "k": q, "v": q + kv}[shard]
        return slice(start, start + (q if shard == "q" else kv))
    half = param.shape[0] // 2
    return slice(shard * half, (shard + 1) * half)


def load_weights(model: nn.Module, model_dir: Path, dtype: torch.dtype) -> None:
    params = dict(model.named_parameters())
    tied = getattr(model.config, "tie_word_embeddings", False)
    loaded: set[str] = set()
    for name, tensor in iter_weights(model_dir):
        if "rotary_emb" in name or (tied and name == "lm_head.weight"):
            continue
        tensor = model.shard.slice_checkpoint(name, tensor)
        target, rows = name, slice(None)
        for ckpt_part, (fused, shard) in model.packed_modules.items():
            if f".{ckpt_part}." in name:
                target = name.replace(ckpt_part, fused)
                rows = _shard_rows(params[target], shard, model.shard)
                break
        if target not in params:
            raise ValueError(f"{model_dir}: checkpoint tensor {name!r} has no place in the model")
        param = params[target]
        with torch.no_grad():
            param.data[rows].copy_(tensor.to(param.dtype))
        loaded.add(f"{target}[{rows.start}]" if rows != slice(None) else target)
    missing = [n for n in params if n not in loaded and not any(
        k.startswith(n + "[") for k in loaded)]
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks weights for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    model.to(dtype)
    logger.info("loaded %d tensors from %s", len(loaded), model_dir)
