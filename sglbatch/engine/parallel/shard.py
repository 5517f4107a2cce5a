"""What each tensor-parallel rank holds of the model (Megatron / SGLang layout).

q/k/v and gate/up are split by output rows (column-parallel), o_proj and down_proj by input
columns (row-parallel, summed by an all-reduce), the embedding and lm_head by vocabulary rows.

Attention heads go in whole GQA groups, as evenly as they go: 3 KV heads over 2 ranks give
rank 0 two groups and rank 1 one (SGLang needs the counts to divide). With more ranks than
KV heads, each KV head is replicated on the ranks that share its group's query heads, as
SGLang does; only more ranks than query heads cannot be split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglbatch.engine.config import ModelConfig
from sglbatch.engine.layers.moe import slice_moe_checkpoint

# Checkpoint module name -> (dimension split, which range splits it).
_SPLITS = {
    "q_proj": (0, "q"), "k_proj": (0, "kv"), "v_proj": (0, "kv"), "o_proj": (1, "q"),
    "gate_proj": (0, "mlp"), "up_proj": (0, "mlp"), "down_proj": (1, "mlp"),
    "embed_tokens": (0, "vocab"), "lm_head": (0, "vocab"),
}


@dataclass(frozen=True)
class RankShard:
    rank: int
    size: int
    head_dim: int
    q_heads: range
    kv_heads: range
    intermediate: range  # MLP columns
    vocab: range  # vocabulary rows this rank holds
    vocab_chunk: int  # rows of its embedding and lm_head: the vocabulary padded to size * chunk
    # MoE: its columns of each expert's intermediate dimension, and of a shared expert's.
    expert_intermediate: range = range(0)
    shared_intermediate: range = range(0)

    @property
    def num_q_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    def slice_checkpoint(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of the full checkpoint tensor `name` (unchanged if replicated)."""
        moe = slice_moe_checkpoint(name, tensor, self.expert_intermediate,
                                   self.shared_intermediate) if self.size > 1 else None
        if moe is not None:
            return moe
        split = _SPLITS.get(name.split(".")[-2]) if self.size > 1 else None
        if split is None:
            return tensor
        dim, what = split
        if dim >= tensor.dim():  # a row-parallel bias would be added once per rank
            raise ValueError(f"checkpoint tensor {name!r} cannot be split over tensor-parallel "
                             "ranks: a row-parallel layer with a bias")
        rows = {"q": _scaled(self.q_heads, self.head_dim),
                "kv": _scaled(self.kv_heads, self.head_dim),
                "mlp": self.intermediate, "vocab": self.vocab}[what]
        part = tensor.narrow(dim, rows.start, len(rows))
        if what == "vocab" and len(rows) < self.vocab_chunk:  # the last rank's padding rows
            pad = part.new_zeros(self.vocab_chunk - len(rows), *part.shape[1:])
            part = torch.cat([part, pad])
        return part


def _scaled(heads: range, head_dim: int) -> range:
    return range(heads.start * head_dim, heads.stop * head_dim)


def even_split(n: int, parts: int) -> list[range]:
    """`n` items in `parts` consecutive ranges whose lengths differ by at most one, the
    longer ones first."""
    base, extra = divmod(n, parts)
    ranges, start = [], 0
    for i in range(parts):
        length = base + (i < extra)
        ranges.append(range(start, start + length))
        start += length
    return ranges


def _head_ranges(heads: int, kv_heads: int, size: int) -> list[tuple[range, range]]:
    """(query heads, kv heads) of each rank."""
    if size > heads:
        raise ValueError(f"tp_size={size} is more ranks than the model's {heads} attention "
                         "heads: each rank needs at least one")
    group = heads // kv_heads
    if size <= kv_heads:
        return [(_scaled(kv, group), kv) for kv in even_split(kv_heads, size)]
    # More ranks than KV heads: KV head k goes to len(ranks) ranks, each with some of its
    # group's query heads. size <= heads guarantees no KV head gets more ranks than queries.
    plan = []
    for kv, ranks in enumerate(even_split(size, kv_heads)):
        for q in even_split(group, len(ranks)):
            plan.append((range(kv * group + q.start, kv * group + q.stop), range(kv, kv + 1)))
    return plan


def plan_shards(config: ModelConfig, size: int) -> tuple[RankShard, ...]:
    """Every rank's shard; ValueError naming the numbers where the model cannot be split."""
    if config.num_attention_heads % config.num_key_value_heads:
        raise ValueError(f"{config.num_attention_heads} attention heads do not form whole "
                         f"groups over {config.num_key_value_heads} KV heads")
    if size > config.intermediate_size:
        raise ValueError(f"tp_size={size} is more ranks than the MLP's "
                         f"{config.intermediate_size} columns")
    # MoE experts' intermediate size (Mixtral's is intermediate_size) and a shared expert's.
    expert = config.hf.get("moe_intermediate_size") or config.intermediate_size
    shared = config.hf.get("shared_expert_intermediate_size") or 0
    for columns in (expert, shared):
        if 0 < columns < size:
            raise ValueError(f"tp_size={size} is more ranks than an MoE expert's {columns} "
                             "columns")
    heads = _head_ranges(config.num_attention_heads, config.num_key_value_heads, size)
    mlp = even_split(config.intermediate_size, size)
    experts, shared_split = even_split(expert, size), even_split(shared, size)
    chunk = -(-config.vocab_size // size)
    return tuple(
        RankShard(rank, size, config.head_dim, q, kv, mlp[rank],
                  range(min(rank * chunk, config.vocab_size),
                        min((rank + 1) * chunk, config.vocab_size)), chunk,
                  experts[rank], shared_split[rank])
        for rank, (q, kv) in enumerate(heads))
