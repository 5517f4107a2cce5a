"""Activations over fused projections."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU over a fused [.., 2 * d] gate/up projection: silu(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """GeGLU (Gemma) over a fused [.., 2 * d] gate/up projection: gelu_tanh(gate) * up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def applied_by_gate_up(gate_up_activated: torch.Tensor) -> torch.Tensor:
    """An MLP's `act` where its gate/up projection already applied the activation (the CPU's
    bf16 kernel, layers.linear.PackedSiluMulLinear)."""
    return gate_up_activated
