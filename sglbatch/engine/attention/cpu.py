"""The CPU backend: C++ kernels that read K/V straight from the pool (no gathered copies, no
padding). Extend attends the whole ragged batch in one kernel call per layer. Decode is a
cascade in two calls per layer: each request's own suffix (the decode kernel), then each
shared prefix read once for all the requests sharing it, merged into their suffix results.
Sliding-window layers skip the cascade: the decode kernel reads each request's window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.attention.torch_native import (
    TorchNativeBackend,
    _DecodeMetadata,
    _SharedPrefix,
)
from sglbatch.engine.batch import ForwardBatch, ForwardMode


@dataclass
class _Ragged:
    rows: torch.Tensor  # each request's row in req_to_token
    starts: torch.Tensor  # first column it attends (after its shared prefix)
    ends: torch.Tensor  # its sequence length
    req_to_token: torch.Tensor


@dataclass
class _Prefixes:
    """A decode batch's shared prefixes as the kernel reads them: group p's members (batch
    indices) are members[offsets[p]:offsets[p + 1]], its prefix the first lens[p] slots of
    req_to_token row rows[p]."""
    rows: torch.Tensor
    lens: torch.Tensor
    offsets: torch.Tensor
    members: torch.Tensor


@dataclass
class _Extend:
    rows: torch.Tensor  # each request's row in req_to_token
    prefix_lens: torch.Tensor  # its tokens already in the pool (its first new position)
    extend_lens: torch.Tensor  # its new tokens
    starts: torch.Tensor  # its first row in q


class CpuBackend(TorchNativeBackend):
    # Extend key blocks at fixed positions (see extend_attention.cpp): the deterministic mode.
    fixed_blocks = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._decode_kernel = cpu_kernels.load("decode_attention")
        self._extend_kernel = cpu_kernels.load("extend_attention")
        if self._decode_kernel is None or self._extend_kernel is None:
            raise RuntimeError("the CPU attention kernels could not be built here")

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if fb.mode == ForwardMode.DECODE:
            super().init_forward_metadata(fb)
        else:
            self._init_extend_metadata(fb)

    def _init_extend_metadata(self, fb: ForwardBatch) -> None:
        # The same for every layer; the kernel reads these (int64) on the host.
        prefix_lens = torch.tensor(fb.prefix_lens_cpu, dtype=torch.int64, device="cpu")
        self._extend_meta = _Extend(fb.req_pool_indices.contiguous(), prefix_lens,
                                    fb.extend_lens.contiguous(), fb.extend_start.contiguous())

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                fb: ForwardBatch) -> torch.Tensor:
        """All requests' new tokens over their slots in the pool, in one kernel call: the
        step's own K/V is read there too (stored before attention), so k and v go unused."""
        m = self._extend_meta
        layer = self.layers[layer_id]
        return self._extend_kernel.extend_attention(
            q, self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id],
            fb.req_to_token, m.rows, m.prefix_lens, m.extend_lens, m.starts, layer.scale,
            layer.sliding_window or 0, layer.logit_softcap or 0.0, self.fixed_blocks)

    def _decode_metadata(self, fb: ForwardBatch, shared: list[_SharedPrefix],
                         prefix_lens: list[int], window: int | None) -> _DecodeMetadata:
        if window is not None:
            # The decode kernel starts each request at its window.
            return _DecodeMetadata(None, self._suffix_metadata(fb, [0] * len(prefix_lens)))
        prefixes = None
        if shared:
            firsts = torch.stack([prefix.rows[0] for prefix in shared])
            sizes = [0] + [len(prefix.rows) for prefix in shared]
            prefixes = _Prefixes(
                fb.req_pool_indices[firsts].contiguous(),
                torch.tensor([prefix_lens[b] for b in firsts.tolist()], device="cpu"),
                torch.tensor(sizes, device="cpu").cumsum(0),
                torch.cat([prefix.rows for prefix in shared]))
        return _DecodeMetadata(prefixes, self._suffix_metadata(fb, prefix_lens))

    def _decode(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        q = q.contiguous()
        out, lse = self._decode_suffixes(q, layer_id)
        p = self._decode_meta.shared
        if p is not None:
            layer = self.layers[layer_id]
            self._extend_kernel.merge_shared_prefixes(
                q, self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id],
                self._decode_meta.suffix.req_to_token, p.rows, p.lens, p.offsets, p.members,
                layer.scale, layer.logit_softcap or 0.0, out, lse)
        return out.to(q.dtype)

    def _suffix_metadata(self, fb: ForwardBatch, prefix_lens: list[int]) -> _Ragged:
        # The C++ kernel reads these on the host.
        return _Ragged(fb.req_pool_indices.contiguous(),
                       torch.tensor(prefix_lens, device="cpu"),
                       torch.tensor(fb.seq_lens_cpu, device="cpu"), fb.req_to_token)

    def _decode_suffixes(self, q: torch.Tensor, layer_id: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 attention [batch, heads, head_dim] of each request over its own keys, and its
        log-sum-exp [batch, heads]."""
        r = self._decode_meta.suffix
        layer = self.layers[layer_id]
        # The kernel skips the keys before each request's window (0: no window, no cap).
        return self._decode_kernel.decode_attention(
            q, self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id],
            r.req_to_token, r.rows, r.starts, r.ends, layer.scale, layer.sliding_window or 0,
            layer.logit_softcap or 0.0)
