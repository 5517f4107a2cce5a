"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router picks each token's top-k experts; each expert is a SwiGLU MLP. The experts are
stacked, w13 [experts, 2 * inter, hidden] (gate rows, then up) and w2 [experts, hidden, inter],
as SGLang stores them, so one Triton kernel (`sglbatch.kernels.fused_moe`) serves every
expert on CUDA. Elsewhere the (token, expert) pairs are sorted by expert and each expert
that got tokens runs one matmul pair over all of them. With each expert's weights prepacked
for oneDNN (`pack_experts`) that measured fastest on the CPU at batch 1, 64 and 256, fp32 and
bf16: 1.5-4x the same loop unpacked, up to 2x one `F.grouped_mm` per projection, and far
ahead of running every expert densely or gathering each pair's weights for a `bmm`.

Under tensor parallelism each expert keeps this rank's columns of its intermediate
dimension (w13 rows, w2 columns), as does a shared expert; the layer's partial sum is
all-reduced once.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from sglbatch.engine.layers.activation import silu_and_mul
from sglbatch.engine.layers.linear import pack_weight, packed_linear
from sglbatch.engine.trace import trace_range

if TYPE_CHECKING:
    from sglbatch.engine.parallel.group import TPGroup

logger = logging.getLogger(__name__)


def expert_count(hf: dict[str, Any]) -> int:
    """config.json's expert count: `num_local_experts` (Mixtral, and what transformers 5
    saves for Qwen3-MoE) or `num_experts` (Qwen MoE checkpoints); 0 for a dense model."""
    return hf.get("num_local_experts") or hf.get("num_experts") or 0


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [tokens, top_k] fp32, expert ids [tokens, top_k]): softmax over all experts
    in fp32, the top k, renormalised to sum to one when asked (Mixtral always; Qwen MoE by
    `norm_topk_prob`), as transformers routes."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_sorted(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, num_experts: int,
               expert_mlp: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_k weights[t, k] * expert_mlp(ids[t, k], x[t]) for each token t, with
    `expert_mlp(e, rows)` called once per expert that got tokens, on all of them."""
    top_k = ids.shape[1]
    flat = ids.flatten()
    order = flat.argsort(stable=True)  # pairs grouped by expert, in token order within one
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync
    token_of = order // top_k
    rows = x[token_of]
    outs, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            outs.append(expert_mlp(expert, rows[start:start + count]))
            start += count
    if not outs:  # no tokens
        return x.new_zeros(x.shape)
    y = (torch.cat(outs).float() * weights.flatten()[order, None]).to(x.dtype)
    return x.new_zeros(x.shape).index_add_(0, token_of, y)


def fused_experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                            weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The experts' output in plain torch ops (what the Triton kernel must match)."""
    return moe_sorted(x, weights, ids, w13.shape[0],
                      lambda e, rows: F.linear(silu_and_mul(F.linear(rows, w13[e])), w2[e]))


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


class FusedExperts(nn.Module):
    """`num_experts` SwiGLU MLPs, stacked; forward(x, weights, ids) sums each token's picks."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate: int):
        super().__init__()
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate))
        self.act = silu_and_mul  # swapped for a compiled one by layers.compile
        # Set by `pack` (CPU): each expert's (w13, w2) in oneDNN's layout, w13/w2 dropped.
        self.packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # None: the Triton kernel on CUDA when triton is installed; True forces it (tests
        # run it under TRITON_INTERPRET=1), False the torch path.
        self.use_kernel: bool | None = None
        self.min_rows = 1  # rows of the packed GEMMs; see layers/linear.make_batch_invariant

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
                ) -> torch.Tensor:
        use_kernel = self.use_kernel
        if use_kernel is None:
            use_kernel = x.device.type == "cuda" and _triton_installed()
        if use_kernel and self.packed is None:
            from sglbatch.kernels.fused_moe import fused_moe

            return fused_moe(x, self.w13, self.w2, weights, ids)
        return moe_sorted(x, weights, ids, self.num_experts, self._expert_mlp)

    def _expert_mlp(self, e: int, rows: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(self.act(F.linear(rows, self.w13[e])), self.w2[e])
        w13, w2 = self.packed[e]
        return packed_linear(self.act(packed_linear(rows, w13, min_rows=self.min_rows)), w2,
                             min_rows=self.min_rows)

    def pack(self) -> None:
        """Prepack every expert's weights for oneDNN (CPU), as layers/linear.py's
        PackedLinear does for nn.Linear; the stacked copies are dropped, not kept twice."""
        self.packed = [(pack_weight(self.w13[e]), pack_weight(self.w2[e]))
                       for e in range(self.num_experts)]
        self.w13 = self.w2 = None


def pack_experts(model: nn.Module) -> int:
    """`FusedExperts.pack` on every expert stack of a CPU model; how many were packed. Leaves
    them as they are where oneDNN cannot take their dtype on this CPU."""
    stacks = [m for m in model.modules() if isinstance(m, FusedExperts) and m.packed is None]
    if not stacks or not torch.backends.mkldnn.is_available():
        return 0
    try:
        packed_linear(stacks[0].w13.new_zeros(1, stacks[0].w13.shape[2]),
                      pack_weight(stacks[0].w13[0]))
    except RuntimeError as exc:
        logger.info("experts left unpacked: oneDNN refused them (%s)", exc)
        return 0
    for stack in stacks:
        stack.pack()
    return len(stacks)


class GatedMLP(nn.Module):
    """A SwiGLU MLP of `columns` intermediate columns, not reduced (Qwen2-MoE's shared
    expert: its partial sum joins the routed experts' before the one all-reduce)."""

    def __init__(self, hidden_size: int, columns: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * columns, bias=False)
        self.down_proj = nn.Linear(columns, hidden_size, bias=False)
        self.act = silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """Router (`gate`), routed `experts` and, with `shared_columns`, a `shared_expert` whose
    output is scaled by sigmoid(`shared_expert_gate`(x)) and added (Qwen2-MoE)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, columns: int,
                 renormalize: bool, group: TPGroup | None, shared_columns: int | None = None):
        super().__init__()
        self.top_k, self.renormalize, self.group = top_k, renormalize, group
        # What the experts a token is routed to cost it (2 FLOPs per weight of its top_k
        # experts' three projections), for the engine's FLOPs per token.
        self.routed_flops_per_token = 2 * top_k * 3 * hidden_size * columns
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = FusedExperts(num_experts, hidden_size, columns)
        self.shared_expert = self.shared_expert_gate = None
        if shared_columns is not None:
            self.shared_expert = GatedMLP(hidden_size, shared_columns)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with trace_range("sglbatch.moe"):
            weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
            out = self.experts(x, weights, ids)
            if self.shared_expert is not None:
                out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
            return out if self.group is None else self.group.all_reduce(out)


# Checkpoint names of expert weights: one tensor per expert and projection (Mixtral's
# w1/w3/w2, Qwen's gate/up/down_proj, what transformers 5 still saves by default), or all
# experts stacked as transformers 5 holds them (save_original_format=False).
_PER_EXPERT = re.compile(r"(.+\.experts)\.(\d+)\.(w1|w3|w2|gate_proj|up_proj|down_proj)\.weight")
_STACKED = re.compile(r"(.+\.experts)\.(gate_up_proj|down_proj)")
_GATE_UP_HALF = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1}


def expert_slot(name: str, params: dict[str, nn.Parameter]) -> tuple[str, Any] | None:
    """Where an expert checkpoint tensor goes: (stacked parameter's name, index into it);
    None for any other tensor."""
    if m := _PER_EXPERT.fullmatch(name):
        module, expert, part = m.group(1), int(m.group(2)), m.group(3)
        if part not in _GATE_UP_HALF:
            return f"{module}.w2", expert
        half, columns = _GATE_UP_HALF[part], params[f"{module}.w13"].shape[1] // 2
        return f"{module}.w13", (expert, slice(half * columns, (half + 1) * columns))
    if m := _STACKED.fullmatch(name):
        return f"{m.group(1)}.{'w13' if m.group(2) == 'gate_up_proj' else 'w2'}", slice(None)
    return None


def slice_moe_checkpoint(name: str, tensor: torch.Tensor, experts: range, shared: range
                         ) -> torch.Tensor | None:
    """One tensor-parallel rank's part of an expert's checkpoint tensor (`experts`: its
    columns of each expert's intermediate dimension) or a shared expert's (`shared`); None
    for any other tensor."""
    if m := _PER_EXPERT.fullmatch(name):
        dim, columns = (0 if m.group(3) in _GATE_UP_HALF else 1), experts
    elif m := _STACKED.fullmatch(name):
        if m.group(2) == "down_proj":  # [experts, hidden, inter]
            return tensor.narrow(2, experts.start, len(experts))
        # [experts, 2 * inter, hidden]: this rank's rows of the gate half and of the up half
        return torch.cat([half.narrow(1, experts.start, len(experts))
                          for half in tensor.chunk(2, dim=1)], dim=1)
    elif ".shared_expert." in name:
        dim, columns = (1 if name.split(".")[-2] == "down_proj" else 0), shared
    else:
        return None
    return tensor.narrow(dim, columns.start, len(columns))
