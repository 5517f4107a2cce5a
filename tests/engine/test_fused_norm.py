"""The fused residual-add + RMSNorm kernel (the CUDA path's norm) inside the model: a tiny
random Llama gives the same hidden states with it as with the torch ops, under Triton's
interpreter on the CPU (on a GPU when there is one)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
pytest.importorskip("triton")

from sglbatch.engine.attention import create_attention_backend
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.kv_pool import KVPool, ReqToTokenPool
from sglbatch.engine.layers.norm import RMSNorm, use_fused_kernel
from tests.engine.conftest import TINY_LLAMA, random_tiny_llama

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _prefill(model, lens: list[int]) -> torch.Tensor:
    """The final hidden states of one extend batch of random prompts of `lens` tokens."""
    c = TINY_LLAMA
    pool = KVPool(64, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, torch.float32,
                  DEVICE)
    table = ReqToTokenPool(len(lens), 32, DEVICE)
    slots = pool.alloc(sum(lens))
    start = 0
    for row, n in enumerate(lens):
        table.table[row, :n] = slots[start:start + n]
        start += n
    backend = create_attention_backend("torch", DEVICE, pool, c.num_attention_heads,
                                       c.num_key_value_heads, c.head_dim)

    def t(x):
        return torch.tensor(x, dtype=torch.int64, device=DEVICE)

    ids = torch.randint(0, c.vocab_size, (sum(lens),), generator=torch.Generator().manual_seed(2))
    fb = ForwardBatch(ForwardMode.EXTEND, ids.to(DEVICE), t([p for n in lens for p in range(n)]),
                      slots.to(DEVICE), t(list(range(len(lens)))), t(lens),
                      t([sum(lens[:i]) for i in range(len(lens))]), table.table, list(lens),
                      [0] * len(lens), list(lens))
    backend.init_forward_metadata(fb)
    return model(fb.input_ids, fb.positions, fb, backend)


@torch.inference_mode()
def test_fused_add_norm_gives_the_unfused_hidden_states():
    model = random_tiny_llama().to(DEVICE)
    expected = _prefill(model, [5, 9])
    use_fused_kernel(model)
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert norms and all(m.fused_add_norm is not None for m in norms)
    torch.testing.assert_close(_prefill(model, [5, 9]), expected, atol=1e-5, rtol=1e-5)
