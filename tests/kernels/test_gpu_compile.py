"""The kernels compile for real GPUs (sm_80, sm_90) down to cubin on any machine: the
interpreter runs kernel code as numpy and cannot catch what only the compiler checks (types
of loop-carried values, `tl.dot` shapes, constexpr use). See gpu_compile.py."""

from __future__ import annotations

from tests.kernels.gpu_compile import compiled_rows

KERNELS = {"_store_kv_kernel", "_extend_kernel", "_decode_stage1", "_decode_stage2",
           "_rmsnorm_kernel"}


def test_every_launch_compiles_to_cubin_for_sm80_and_sm90():
    rows = compiled_rows("tests.kernels.gpu_compile")
    assert all(row["cubin_bytes"] > 0 for row in rows)
    compiled = {(row["kernel"], row["target"], "*bf16" in row["types"]) for row in rows}
    assert compiled == {(kernel, target, bf16) for kernel in KERNELS
                        for target in ("sm_80", "sm_90") for bf16 in (False, True)}
