"""Linear layers with their weights prepacked once at load (CPU only).

bf16 weights, where the AVX512-BF16 kernel builds (attention/csrc/linear.cpp), are packed
for it: it reads each weight from memory once per product, where oneDNN reads them more
than once at decode's few rows. Measured on SmolLM2's linears at 64 rows, weights from
DRAM as in a model: 26.0 -> 19.5 ms per step; at 1 row 8.0 -> 6.5 ms; within 3% of oneDNN
at 2048 rows. It also applies SwiGLU to the gate/up product before storing it. Each row
gets the same bits whatever the batch.

Other dtypes (or CPUs) use oneDNN with its own blocked layout: `F.linear` on a plain weight
makes oneDNN reorder it on every call; packed once, the same products run 15-25% faster at
decode batch sizes and 2x at batch 1, with identical results.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.huge_pages import on_huge_pages
from sglbatch.engine.layers.activation import applied_by_gate_up, silu_and_mul
from sglbatch.engine.trace import trace_range

logger = logging.getLogger(__name__)

# Profiles see the bf16 kernel, called outside torch's dispatcher, through this range.
TRACE_NAME = "sglbatch.linear"
_BLOCK = 64  # the bf16 kernel's output columns per packed block


# oneDNN's GEMM gives each row the same bits whatever the row count, except for one row
# alone (its matrix-vector path sums in another order): measured on SmolLM2's down_proj, a
# row's output alone differed from the same row among 2..2560. Batch-invariant mode runs a
# lone row as two.
BATCH_INVARIANT_MIN_ROWS = 2


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] weight in oneDNN's blocked layout, for `packed_linear`."""
    # The batch-size hint only picks a layout variant; measured equal for 1..2048 rows.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 64)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None,
                  min_rows: int = 1) -> torch.Tensor:
    """x @ weight.T (+ bias) with a `pack_weight` weight; with fewer than `min_rows` rows,
    zero rows are added for the product and dropped from the result."""
    rows = x.shape[0]
    if rows < min_rows:
        x = torch.cat([x, x.new_zeros(min_rows - rows, x.shape[1])])
    out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return out if rows >= min_rows else out[:rows]


def bf16_kernels(dtype: torch.dtype) -> ModuleType | None:
    """The bf16 linear kernel's module, where `dtype` is bf16 and this CPU builds it."""
    if dtype != torch.bfloat16:
        return None
    kernels = cpu_kernels.load("linear")
    return kernels if kernels is not None and kernels.available() else None


def pack_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """A [out, in] bf16 weight as the kernel reads it: [out/64, in/2, 64, 2], for each pair
    of inputs the 64 columns' two weights side by side (zero-padded to whole blocks)."""
    out_features, in_features = weight.shape
    padded = F.pad(weight.detach(), (0, in_features % 2, 0, -out_features % _BLOCK))
    # On huge pages: one row's product streams the weights (see huge_pages).
    return on_huge_pages(padded.view(padded.shape[0] // _BLOCK, _BLOCK, padded.shape[1] // 2, 2)
                         .permute(0, 2, 1, 3))


def pack_bf16_gate_up(weight: torch.Tensor) -> torch.Tensor:
    """A fused [2 * d, in] gate/up weight packed so that each block holds 32 columns of
    gate then the same 32 of up: the kernel's SwiGLU pairs them in registers."""
    gate, up = weight.detach().chunk(2)
    pad = -gate.shape[0] % (_BLOCK // 2)
    gate, up = F.pad(gate, (0, 0, 0, pad)), F.pad(up, (0, 0, 0, pad))
    blocks = gate.shape[0] // (_BLOCK // 2)
    paired = torch.cat([gate.view(blocks, _BLOCK // 2, -1), up.view(blocks, _BLOCK // 2, -1)],
                       dim=1)
    return pack_bf16_weight(paired.reshape(blocks * _BLOCK, -1))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


class PackedLinear(nn.Module):
    """nn.Linear's product on a weight packed at load: for the bf16 kernel where `kernels`
    is given, else for oneDNN."""

    def __init__(self, linear: nn.Linear, kernels: ModuleType | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernels = kernels
        if kernels is not None:
            self.packed_weight = pack_bf16_weight(linear.weight)
            self.bias = None if linear.bias is None else linear.bias.detach().float()
        else:
            self.packed_weight = pack_weight(linear.weight)
            self.bias = None if linear.bias is None else linear.bias.detach()
        self.min_rows = 1  # see make_batch_invariant (the bf16 kernel is invariant anyway)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None:
            return packed_linear(x, self.packed_weight, self.bias, self.min_rows)
        with trace_range(TRACE_NAME):
            out = self.kernels.linear(_rows(x), self.packed_weight, self.bias,
                                      self.out_features)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        packing = "oneDNN" if self.kernels is None else "bf16 kernel"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"packed for {packing}")


class PackedSiluMulLinear(nn.Module):
    """A gate/up projection and SwiGLU in one bf16 kernel: silu(x @ gate.T) * (x @ up.T),
    never storing the product. Its MLP's `act` becomes `applied_by_gate_up`."""

    def __init__(self, linear: nn.Linear, kernels: ModuleType):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features // 2
        self.kernels = kernels
        self.packed_weight = pack_bf16_gate_up(linear.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with trace_range(TRACE_NAME):
            out = self.kernels.silu_mul_linear(_rows(x), self.packed_weight, self.out_features)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features=2 x {self.out_features}, "
                "SwiGLU applied, packed for bf16 kernel")


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of a CPU model by a PackedLinear (a bias-free gate/up
    projection followed by SwiGLU, in bf16, by a PackedSiluMulLinear); returns how many.
    Leaves the model as it is where neither kernel can take its dtype on this CPU."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    if not targets:
        return 0
    kernels = bf16_kernels(targets[0][2].weight.dtype)
    if kernels is None:
        if not torch.backends.mkldnn.is_available():
            return 0
        try:
            probe = PackedLinear(targets[0][2])
            probe(torch.zeros(1, probe.in_features, dtype=targets[0][2].weight.dtype))
        except RuntimeError as exc:
            logger.info("weights left unpacked: oneDNN refused them (%s)", exc)
            return 0
    for parent, name, child in targets:
        if (kernels is not None and name == "gate_up_proj" and child.bias is None
                and getattr(parent, "act", None) is silu_and_mul):
            setattr(parent, name, PackedSiluMulLinear(child, kernels))
            parent.act = applied_by_gate_up
        else:
            setattr(parent, name, PackedLinear(child, kernels))
    return len(targets)


def make_batch_invariant(model: nn.Module) -> None:
    """Every packed GEMM of the model (PackedLinear, packed experts) gives a row the same
    bits whatever its batch: enable_deterministic_inference on the CPU."""
    for module in model.modules():
        if hasattr(module, "min_rows"):
            module.min_rows = BATCH_INVARIANT_MIN_ROWS


def model_flops_per_token(model: nn.Module) -> int:
    """2 FLOPs per weight of every linear layer (the LM head included; tied or not),
    packed (`PackedLinear`) or not, plus what a Mixture-of-Experts layer's routed experts
    cost a token (`routed_flops_per_token`: its top-k experts only)."""
    linear = 2 * sum(m.in_features * m.out_features for m in model.modules()
                     if isinstance(m, (nn.Linear, PackedLinear)))
    # A fused gate/up projection computes 2 * out_features columns.
    linear += 4 * sum(m.in_features * m.out_features for m in model.modules()
                      if isinstance(m, PackedSiluMulLinear))
    return linear + sum(getattr(m, "routed_flops_per_token", 0) for m in model.modules())
