"""Streams (name, tensor) pairs out of a model directory's safetensors into the model,
merging separate q/k/v and gate/up checkpoint tensors into the fused parameters. A
tensor-parallel rank's model takes only its shard of each tensor (`model.shard`).
Checkpoints that store them fused already (Phi-3) are split into the parts first, so each
part is sliced for its rank like a separate tensor. MoE experts' tensors go into the
stacked expert weights (layers/moe.py); a model's `checkpoint_renames` (old -> new name
fragment) maps checkpoint module names that differ from its own."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from sglbatch.engine.config import ModelConfig
from sglbatch.engine.layers.moe import expert_slot
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


def _split_fused(config: ModelConfig, name: str, tensor: torch.Tensor
                 ) -> list[tuple[str, torch.Tensor]]:
    """A checkpoint's fused self_attn.qkv_proj / mlp.gate_up_proj as its parts, named as
    separate checkpoints name them; any other tensor unchanged."""
    parent, module = name.split(".")[-3:-1] if name.count(".") >= 2 else ("", "")
    if (parent, module) == ("self_attn", "qkv_proj"):
        q = config.num_attention_heads * config.head_dim
        kv = config.num_key_value_heads * config.head_dim
        parts = zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]))
    elif (parent, module) == ("mlp", "gate_up_proj"):
        parts = zip(("gate_proj", "up_proj"), tensor.chunk(2))
    else:
        return [(name, tensor)]
    return [(name.replace(f".{module}.", f".{part}."), t) for part, t in parts]


def load_weights(model: nn.Module, model_dir: Path, dtype: torch.dtype) -> None:
    params = dict(model.named_parameters())
    tied = getattr(model.config, "tie_word_embeddings", False)
    loaded: set[str] = set()
    checkpoint = (part for name, tensor in iter_weights(model_dir)
                  for part in _split_fused(model.config, name, tensor))
    renames = getattr(model, "checkpoint_renames", {})
    for name, tensor in checkpoint:
        for old, new in renames.items():
            name = name.replace(old, new)
        if "rotary_emb" in name or (tied and name == "lm_head.weight"):
            continue
        tensor = model.shard.slice_checkpoint(name, tensor)
        slot = expert_slot(name, params)  # an MoE expert's: (stacked parameter, index)
        target, rows = slot or (name, slice(None))
        for ckpt_part, (fused, shard) in model.packed_modules.items():
            if slot is None and f".{ckpt_part}." in name:
                target = name.replace(ckpt_part, fused)
                rows = _shard_rows(params[target], shard, model.shard)
                break
        if target not in params:
            raise ValueError(f"{model_dir}: checkpoint tensor {name!r} has no place in the model")
        param = params[target]
        with torch.no_grad():
            param.data[rows].copy_(tensor.to(param.dtype))
        loaded.add(target if rows == slice(None) else f"{target}[{rows}]")
    missing = [n for n in params if n not in loaded and not any(
        k.startswith(n + "[") for k in loaded)]
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks weights for {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}")
    model.to(dtype)
    logger.info("loaded %d tensors from %s", len(loaded), model_dir)
