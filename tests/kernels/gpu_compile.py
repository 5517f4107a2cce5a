"""Compile every kernel launch the wrappers make for real GPUs, with no GPU present.

Run as `python -m tests.kernels.gpu_compile` without TRITON_INTERPRET (the interpreter's
`triton.jit` cannot be compiled). Each wrapper is called on CPU tensors with `JITFunction.run`
replaced by a recorder, so nothing executes; each recorded launch (its argument types and
constexprs) then goes through Triton's real pipeline for each target: TTIR -> TTGIR -> LLVM
-> PTX -> cubin (Triton's bundled ptxas). Prints one JSON line per compiled launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TARGETS = {"sm_80": 80, "sm_90": 90}
_POINTER = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
            torch.int64: "*i64", torch.int32: "*i32"}


def compiled_rows(module: str) -> list[dict]:
    """Run `python -m <module>` (a script printing one JSON row per compiled launch) outside
    the interpreter, as compiling for a GPU target needs, and return its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", module], cwd=Path(__file__).resolve().parents[2],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def record_launches(calls) -> list[tuple[object, dict]]:
    """(kernel, {arg name: value}) for every launch `calls()` makes, none of them run."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, {**dict(zip(self.arg_names, args)), **kwargs}))

    original, JITFunction.run = JITFunction.run, record
    try:
        calls()
    finally:
        JITFunction.run = original
    return launches


def signature(kernel, values: dict) -> tuple[dict, dict]:
    sig, constexprs = {}, {}
    for name, param in zip(kernel.arg_names, kernel.params):
        value = values[name]
        if param.is_constexpr:
            sig[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = _POINTER[value.dtype]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32" if -2**31 <= value < 2**31 else "i64"
    return sig, constexprs


def wrapper_calls() -> None:
    """The wrappers at the shapes the engine uses: GQA 1 and 3, head dims 64 and 128, fp32
    and bf16 (the GPU's 16-bit type); attention also with a sliding window and soft-cap."""
    from sglbatch.kernels.decode_attention import decode_attention
    from sglbatch.kernels.extend_attention import extend_attention
    from sglbatch.kernels.kv_store import store_kv
    from sglbatch.kernels.rmsnorm import rmsnorm
    from tests.kernels.ragged import ragged_batch

    for dtype in (torch.float32, torch.bfloat16):
        for kv_heads, group, dim in ((3, 3, 64), (2, 1, 128)):
            r = ragged_batch([5, 40], [3, 1], kv_heads, dim, dtype, seed=0)
            tokens = int(r.extend_lens.sum())
            q = torch.zeros(tokens, kv_heads * group, dim, dtype=dtype)
            k = torch.zeros(tokens, kv_heads, dim, dtype=dtype)
            store_kv(k, k, r.new_loc, r.k_buf, r.v_buf)
            for window, cap in ((None, None), (16, 30.0)):
                extend_attention(q, k, k, r.k_buf, r.v_buf, r.req_to_token,
                                 r.req_pool_indices, r.prefix_lens, r.extend_lens,
                                 r.extend_start, dim ** -0.5, 3, window, cap)
                decode_attention(q[:2], r.k_buf, r.v_buf, r.req_to_token, r.req_pool_indices,
                                 r.prefix_lens + 1, dim ** -0.5, 8, window, cap)
        x = torch.zeros(4, 576, dtype=dtype)
        rmsnorm(x, torch.ones(576, dtype=dtype), 1e-5)
        rmsnorm(x, torch.ones(576, dtype=dtype), 1e-5, residual=torch.zeros_like(x))


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled",
              file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for kernel, values in record_launches(wrapper_calls):
        sig, constexprs = signature(kernel, values)
        for name, capability in TARGETS.items():
            compiled = triton.compile(ASTSource(kernel, sig, constexprs),
                                      target=GPUTarget("cuda", capability, 32))
            print(json.dumps({"kernel": kernel.__name__, "target": name,
                              "types": sorted({t for t in sig.values() if t.startswith("*")}),
                              "cubin_bytes": len(compiled.asm["cubin"])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
