"""Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2) on the engine's own layers.

Projections are fused (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`) so a layer runs
two big matmuls instead of five; `packed_modules` tells the loader how checkpoints map in.

Under tensor parallelism (a `group`), each rank builds its `shard` of every layer (see
parallel/shard.py) and the layers whose partial results must be summed (o_proj, down_proj,
the embedding) all-reduce them; the logits are gathered to rank 0.

The pieces are reused by other families: a family that differs in one part overrides
`make_rotary` or `make_layer`, or subclasses the attention (qwen3.py).
"""

from __future__ import annotations

import torch
from torch import nn

from sglbatch.engine.attention.base import AttentionBackend, LayerAttention
from sglbatch.engine.batch import ForwardBatch
from sglbatch.engine.config import ModelConfig
from sglbatch.engine.layers.activation import silu_and_mul
from sglbatch.engine.layers.norm import RMSNorm
from sglbatch.engine.layers.rotary import RotaryEmbedding
from sglbatch.engine.parallel.group import TPGroup
from sglbatch.engine.parallel.shard import RankShard, plan_shards
from sglbatch.engine.trace import trace_range


def all_reduce(group: TPGroup | None, x: torch.Tensor) -> torch.Tensor:
    return x if group is None else group.all_reduce(x)


def layer_windows(config: ModelConfig) -> list[int | None]:
    """Each layer's sliding window as transformers derives it from config.json: from
    `layer_types` when given; Qwen2/Qwen3 slide only with `use_sliding_window`, from layer
    `max_window_layers` on; Mistral slides every layer."""
    hf, layers = config.hf, config.num_hidden_layers
    window = hf.get("sliding_window")
    if window is None:
        return [None] * layers
    if hf.get("layer_types"):
        return [window if t == "sliding_attention" else None for t in hf["layer_types"]]
    if "use_sliding_window" in hf:
        if not hf["use_sliding_window"]:
            return [None] * layers
        first = hf.get("max_window_layers", 0)
        return [window if i >= first else None for i in range(layers)]
    return [window] * layers


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rotary: RotaryEmbedding,
                 shard: RankShard, group: TPGroup | None):
        super().__init__()
        self.layer_id = layer_id
        self.group = group
        self.head_dim = config.head_dim
        self.q_size = shard.num_q_heads * config.head_dim
        self.kv_size = shard.num_kv_heads * config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.rotary = rotary

    def norm_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k as rope takes them: as projected (subclasses normalise them)."""
        return q, k

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, fb: ForwardBatch,
                attn: AttentionBackend) -> torch.Tensor:
        with trace_range("sglbatch.attention"):
            q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size],
                                                  dim=-1)
            q, k = self.norm_qk(q, k)
            # With the CPU's kernel (layers.fused_cpu), rope runs in place and stores the
            # new K/V in the pool in the same pass, for a backend that reads them back.
            stored = self.rotary.rope_store_kv is not None and attn.accepts_stored_kv
            if stored:
                pool = attn.kv_pool
                self.rotary.rotate_and_store(positions, q, k, v, pool.k_buffers[self.layer_id],
                                             pool.v_buffers[self.layer_id], fb.out_cache_loc)
            else:
                q, k = self.rotary(positions, q, k)
                v = v.contiguous()
            with trace_range("sglbatch.attention_backend"):
                out = attn.forward(q, k, v, self.layer_id, fb, kv_stored=True) if stored \
                    else attn.forward(q, k, v, self.layer_id, fb)
            return all_reduce(self.group, self.o_proj(out))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, shard: RankShard, group: TPGroup | None):
        super().__init__()
        columns = len(shard.intermediate)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * columns, bias=False)
        self.down_proj = nn.Linear(columns, config.hidden_size, bias=False)
        self.group = group
        self.act = silu_and_mul  # swapped for a compiled one by layers.compile

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with trace_range("sglbatch.mlp"):
            return all_reduce(self.group, self.down_proj(self.act(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block around any attention and MLP (an MoE block fits as the `mlp`)."""

    def __init__(self, config: ModelConfig, layer_id: int, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.trace_name = f"sglbatch.layer.{layer_id}"

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, fb: ForwardBatch,
                attn: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it). The residual add of
        each sublayer is done by the next norm, which can fuse it (layers.norm)."""
        with trace_range(self.trace_name):
            if residual is None:  # the first layer: the stream is the embeddings
                residual, hidden = hidden, self.input_layernorm(hidden)
            else:
                hidden, residual = self.input_layernorm(hidden, residual)
            hidden = self.self_attn(positions, hidden, fb, attn)
            hidden, residual = self.post_attention_layernorm(hidden, residual)
            return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, shard: RankShard, layers: list[nn.Module],
                 norm: nn.Module):
        super().__init__()
        self.embed_tokens = nn.Embedding(shard.vocab_chunk, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class LlamaForCausalLM(nn.Module):
    # checkpoint name fragment -> (our fused module, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig, shard: RankShard | None = None,
                 group: TPGroup | None = None):
        super().__init__()
        self.config = config
        self.shard = shard or plan_shards(config, 1)[0]  # what the loader fills
        self.group = group
        rotary = self.make_rotary(config)  # one table shared by every layer
        self.model = LlamaModel(
            config, self.shard,
            [self.make_layer(config, i, rotary) for i in range(config.num_hidden_layers)],
            self.make_norm(config))
        self.lm_head = nn.Linear(config.hidden_size, self.shard.vocab_chunk, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_rotary(self, config: ModelConfig) -> nn.Module:
        return RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                               config.rope_theta, config.rope_scaling)

    def make_layer(self, config: ModelConfig, layer_id: int, rotary: nn.Module) -> nn.Module:
        return LlamaDecoderLayer(
            config, layer_id, LlamaAttention(config, layer_id, rotary, self.shard, self.group),
            LlamaMLP(config, self.shard, self.group))

    def make_norm(self, config: ModelConfig) -> nn.Module:
        return RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_layers(self) -> list[LayerAttention]:
        """Each layer's attention (scale, window, soft-cap), for the attention backend."""
        scale = self.config.head_dim ** -0.5
        return [LayerAttention(scale, window) for window in layer_windows(self.config)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, fb: ForwardBatch,
                attn: AttentionBackend) -> torch.Tensor:
        """Returns final hidden states [tokens, hidden] (normed); see `compute_logits`."""
        hidden, residual = self.embed(input_ids), None
        for layer in self.model.layers:
            hidden, residual = layer(positions, hidden, residual, fb, attn)
        return self.model.norm(hidden, residual)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return self.model.embed_tokens(input_ids)
        # Vocabulary-parallel: rows of ids outside this rank's range are zero; the all-reduce
        # sums the one rank's row with zeros (exact).
        local = input_ids - self.shard.vocab.start
        outside = (local < 0) | (local >= len(self.shard.vocab))
        hidden = self.model.embed_tokens(local.masked_fill(outside, 0))
        return self.group.all_reduce(hidden.masked_fill_(outside[:, None], 0))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [tokens, vocab]; under tensor parallelism every rank must call it, and only
        rank 0 gets them (None elsewhere)."""
        with trace_range("sglbatch.logits"):
            logits = self.lm_head(hidden)
            if self.group is None:
                return logits
            return self.group.gather_vocab(logits, self.config.vocab_size)


# Qwen2 is Llama plus a q/k/v bias, which ModelConfig.attention_bias carries; Mistral is
# Llama with an explicit head_dim. Both take their sliding windows from `layer_windows`.
ARCHITECTURES = {"LlamaForCausalLM": LlamaForCausalLM, "MistralForCausalLM": LlamaForCausalLM,
                 "Qwen2ForCausalLM": LlamaForCausalLM}
