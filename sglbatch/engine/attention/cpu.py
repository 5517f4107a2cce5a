"""The CPU backend: torch's extend path and cascade, with each request's decode attention
done by a C++ kernel that reads K/V straight from the pool (no gathered copies, no padding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.attention.torch_native import TorchNativeBackend
from sglbatch.engine.batch import ForwardBatch


@dataclass
class _Ragged:
    rows: torch.Tensor  # each request's row in req_to_token
    starts: torch.Tensor  # first column it attends (after its shared prefix)
    ends: torch.Tensor  # its sequence length
    req_to_token: torch.Tensor


class CpuBackend(TorchNativeBackend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._kernels = cpu_kernels.load()
        if self._kernels is None:
            raise RuntimeError("the CPU attention kernel could not be built here")

    def _suffix_metadata(self, fb: ForwardBatch, rows: torch.Tensor,
                         prefix_lens: list[int]) -> _Ragged:
        # The C++ kernel reads these on the host.
        return _Ragged(fb.req_pool_indices.contiguous(),
                       torch.tensor(prefix_lens, device="cpu"),
                       torch.tensor(fb.seq_lens_cpu, device="cpu"), fb.req_to_token)

    def _decode_suffixes(self, q: torch.Tensor, layer_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        r = self._decode_meta.suffix
        layer = self.layers[layer_id]
        # The kernel skips the keys before each request's window (0: no window, no cap).
        out, lse = self._kernels.decode_attention(
            q.contiguous(), self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id],
            r.req_to_token, r.rows, r.starts, r.ends, layer.scale, layer.sliding_window or 0,
            layer.logit_softcap or 0.0)
        group = self.num_heads // self.num_kv_heads
        shape = (q.shape[0], self.num_kv_heads, group)
        return out.view(*shape, self.head_dim), lse.view(*shape, 1)
