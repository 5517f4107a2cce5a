"""The fused MoE kernel against the torch reference (the engine's CPU path) over ragged token
counts, top-k 1/2/8 and 4-64 experts; the block alignment's invariants; and its launches
compiled for real GPUs (run as `python -m tests.kernels.test_fused_moe`, as gpu_compile.py)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from tests.device_follow import DeviceCheck, assert_all_named
from tests.kernels.gpu_compile import compiled_rows
from tests.kernels.ragged import DEVICE, HALF, tolerance


def _problem(tokens: int, experts: int, top_k: int, hidden: int, inter: int,
             dtype: torch.dtype, seed: int = 0):
    from sglbatch.engine.layers.moe import select_experts

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = 0.2 * torch.randn(experts, 2 * inter, hidden, generator=gen)
    w2 = 0.2 * torch.randn(experts, hidden, inter, generator=gen)
    weights, ids = select_experts(torch.randn(tokens, experts, generator=gen), top_k, True)
    return [t.to(DEVICE) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


@pytest.mark.parametrize("tokens,experts,top_k,hidden,inter,dtype", [
    pytest.param(1, 4, 1, 32, 32, torch.float32, id="1tok-4e-top1"),
    pytest.param(7, 8, 2, 40, 24, torch.float32, id="7tok-8e-top2-not-pow2"),
    pytest.param(33, 64, 8, 32, 16, torch.float32, id="33tok-64e-top8"),
    pytest.param(40, 4, 2, 32, 48, torch.float32, id="40tok-4e-top2-block64"),
    pytest.param(7, 16, 2, 64, 80, HALF, id="7tok-16e-top2-16bit-two-k-tiles"),
])
def test_fused_moe_matches_reference(tokens, experts, top_k, hidden, inter, dtype):
    from sglbatch.engine.layers.moe import fused_experts_reference
    from sglbatch.kernels.fused_moe import fused_moe

    x, w13, w2, weights, ids = _problem(tokens, experts, top_k, hidden, inter, dtype)
    with DeviceCheck() as check:
        out = fused_moe(x, w13, w2, weights, ids)
    assert_all_named(check)
    ref = fused_experts_reference(x.float(), w13.float(), w2.float(), weights, ids)
    torch.testing.assert_close(out.float(), ref, **tolerance(dtype))


def test_engine_layer_runs_the_kernel_when_asked():
    """The MoE block with `use_kernel` (the CUDA default) gives its torch path's output."""
    from sglbatch.engine.layers.moe import SparseMoeBlock

    torch.manual_seed(0)
    block = SparseMoeBlock(48, 8, 2, 40, False, None, shared_columns=24).to(DEVICE)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(9, 48, device=DEVICE)
    block.experts.use_kernel = False
    with torch.no_grad():
        ref = block(x)
    block.experts.use_kernel = True
    with torch.no_grad(), DeviceCheck() as check:
        out = block(x)
    assert_all_named(check)
    torch.testing.assert_close(out, ref, **tolerance(torch.float32))


def test_no_tokens():
    from sglbatch.kernels.fused_moe import fused_moe

    x, w13, w2, weights, ids = _problem(0, 4, 2, 32, 32, torch.float32)
    assert fused_moe(x, w13, w2, weights, ids).shape == (0, 32)


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(1, 64, 8, 16), (33, 8, 2, 16),
                                                          (100, 4, 2, 64)])
def test_alignment_puts_each_pair_once_in_its_experts_blocks(tokens, experts, top_k, block_m):
    from sglbatch.kernels.fused_moe import moe_align_block_size

    ids = _problem(tokens, experts, top_k, 16, 16, torch.float32)[4]
    sorted_ids, block_expert, rows_used = (t.cpu() for t in
                                           moe_align_block_size(ids, block_m, experts))
    pairs = ids.numel()
    used = int(rows_used)
    assert len(sorted_ids) % block_m == 0 and used <= len(sorted_ids)
    assert sorted(sorted_ids[sorted_ids < pairs].tolist()) == list(range(pairs))
    assert bool((sorted_ids[used:] == pairs).all())  # past the used rows: padding only
    flat = ids.flatten().cpu()
    for b in range(used // block_m):
        block = sorted_ids[b * block_m:(b + 1) * block_m]
        real = block[block < pairs]
        assert len(real) > 0, "a used block with no pair"
        assert bool((flat[real.long()] == block_expert[b]).all())
    # Blocks go in expert order, each expert's pairs in token order.
    order = [p for p in sorted_ids[:used].tolist() if p < pairs]
    assert order == sorted(range(pairs), key=lambda p: (int(flat[p]), p))


# --- compiled for real GPUs (see gpu_compile.py) ---

def _wrapper_calls() -> None:
    """The kernel's launches at decode and prefill sizes (both block heights), fp32 and
    bf16, with hidden and inter sizes that are not powers of two."""
    from sglbatch.kernels.fused_moe import fused_moe

    for dtype in (torch.float32, torch.bfloat16):
        for tokens in (2, 300):
            x = torch.zeros(tokens, 576, dtype=dtype)
            w13 = torch.zeros(8, 2 * 384, 576, dtype=dtype)
            w2 = torch.zeros(8, 576, 384, dtype=dtype)
            ids = torch.arange(tokens * 2).view(tokens, 2) % 8
            fused_moe(x, w13, w2, torch.full((tokens, 2), 0.5), ids)


def _compile_main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tests.kernels.gpu_compile import TARGETS, record_launches, signature

    seen = set()
    for kernel, values in record_launches(_wrapper_calls):
        sig, constexprs = signature(kernel, values)
        key = (json.dumps(sig, sort_keys=True), json.dumps(constexprs, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        for name, capability in TARGETS.items():
            compiled = triton.compile(ASTSource(kernel, sig, constexprs),
                                      target=GPUTarget("cuda", capability, 32))
            print(json.dumps({"target": name, "bf16": "*bf16" in sig.values(),
                              "swiglu": constexprs["SWIGLU"], "block_m": constexprs["BLOCK_M"],
                              "cubin_bytes": len(compiled.asm["cubin"]),
                              "shared_bytes": compiled.metadata.shared}), flush=True)
    return 0


def test_every_launch_compiles_to_cubin_for_sm80_and_sm90():
    rows = compiled_rows("tests.kernels.test_fused_moe")
    assert all(row["cubin_bytes"] > 0 for row in rows)
    # What the launch would need: an A100 block gets at most 163 KiB of shared memory.
    assert max(row["shared_bytes"] for row in rows) <= 163 * 1024
    assert {(r["target"], r["bf16"], r["swiglu"], r["block_m"]) for r in rows} == {
        (t, bf16, swiglu, block_m) for t in ("sm_80", "sm_90") for bf16 in (False, True)
        for swiglu in (False, True) for block_m in (16, 64)}


if __name__ == "__main__":
    sys.exit(_compile_main())
