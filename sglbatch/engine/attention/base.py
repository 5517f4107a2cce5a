"""The contract every attention backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglbatch.engine.batch import ForwardBatch
from sglbatch.engine.kv_pool import KVPool


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention differs in (Gemma's and Mistral's layers differ).

    `sliding_window` follows config.json: a query at position i sees keys at positions
    i - sliding_window + 1 .. i (itself included); None is full causal attention.
    `logit_softcap` s maps each score x (after `scale`) to s * tanh(x / s) (Gemma 2)."""

    scale: float
    sliding_window: int | None = None
    logit_softcap: float | None = None


class AttentionBackend(ABC):
    """Attention over the paged KV pool for a ragged batch.

    `init_forward_metadata` runs once per forward pass (index math shared by all layers);
    `forward` runs once per layer: it writes the new tokens' K/V into their slots
    (`fb.out_cache_loc`) and returns attention over each request's full sequence, causal
    within the new tokens.
    """

    # Whether decode can be captured in a CUDA graph: see `init_forward_metadata_graph`.
    supports_cuda_graph = False
    # Whether `forward` takes `kv_stored=True`: the caller has already written the new
    # tokens' K/V into their slots (the CPU's fused rope, see models.llama), so it must
    # not store them again. Only for backends that read K/V back from the pool.
    accepts_stored_kv = False

    def __init__(self, kv_pool: KVPool, num_heads: int, num_kv_heads: int, head_dim: int,
                 layers: Sequence[LayerAttention] | None = None):
        self.kv_pool = kv_pool
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        # One entry per layer (`layer_id` indexes it); plain scaled causal attention by default.
        self.layers = tuple(layers) if layers is not None else \
            (LayerAttention(self.scale),) * kv_pool.num_layers

    @abstractmethod
    def init_forward_metadata(self, fb: ForwardBatch) -> None: ...

    def init_forward_metadata_graph(self, fb: ForwardBatch, seq_lens: torch.Tensor) -> None:
        """Decode metadata for a CUDA graph: from device tensors only (no host work), with
        `seq_lens` [batch] int32 a static buffer the graph runner refills before replays."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")

    def store_kv(self, layer_id: int, fb: ForwardBatch, k: torch.Tensor, v: torch.Tensor
                 ) -> None:
        """The step's new K/V ([tokens, kv_heads * head_dim]) into their slots."""
        self.kv_pool.set_kv(layer_id, fb.out_cache_loc,
                            k.view(-1, self.num_kv_heads, self.head_dim),
                            v.view(-1, self.num_kv_heads, self.head_dim))

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                fb: ForwardBatch) -> torch.Tensor:
        """q: [tokens, heads * head_dim]; k, v: [tokens, kv_heads * head_dim].
        Returns [tokens, heads * head_dim]."""
