"""The Triton backend: the kernels of `sglbatch.kernels` over the paged pool.

Each layer stores the step's K/V into their slots with one kernel, then runs extend
attention (prefix read from the pool, new tokens from the step's K/V) or split-KV decode
attention. The metadata is a few small int32 tensors on the pool's device, built once per
forward; for decode it is only `seq_lens`, which a CUDA graph can keep in a static buffer.
Off a GPU the kernels need `TRITON_INTERPRET=1` (set before `sglbatch.kernels` is imported).
"""

from __future__ import annotations

import torch

from sglbatch.engine.attention.base import AttentionBackend
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.overlap import tensor_to_device
from sglbatch.kernels.decode_attention import MAX_NUM_SPLITS, decode_attention, num_splits_for
from sglbatch.kernels.extend_attention import extend_attention
from sglbatch.kernels.kv_store import store_kv


class TritonBackend(AttentionBackend):
    supports_cuda_graph = True

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        device = fb.req_to_token.device

        def ints(values: list[int]) -> torch.Tensor:
            return tensor_to_device(values, torch.int32, device)

        self._seq_lens = ints(fb.seq_lens_cpu)
        self._max_seq_len = max(fb.seq_lens_cpu)
        if fb.mode == ForwardMode.EXTEND:
            self._prefix_lens = ints(fb.prefix_lens_cpu)
            self._extend_lens = ints(fb.extend_lens_cpu)
            self._extend_start = fb.extend_start.to(torch.int32)
            self._max_extend_len = max(fb.extend_lens_cpu, default=0)

    def init_forward_metadata_graph(self, fb: ForwardBatch, seq_lens: torch.Tensor) -> None:
        # The graph runner refills `seq_lens` (its static buffer) before each replay.
        self._seq_lens = seq_lens
        self._max_seq_len = None  # one split count for every replay: MAX_NUM_SPLITS

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                fb: ForwardBatch) -> torch.Tensor:
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q = q.view(-1, self.num_heads, self.head_dim)
        k_buf, v_buf = self.kv_pool.k_buffers[layer_id], self.kv_pool.v_buffers[layer_id]
        store_kv(k, v, fb.out_cache_loc, k_buf, v_buf)
        layer = self.layers[layer_id]
        if fb.mode == ForwardMode.DECODE:
            # A windowed layer splits only its window's keys.
            num_splits = MAX_NUM_SPLITS if self._max_seq_len is None else \
                num_splits_for(self._max_seq_len, layer.sliding_window)
            out = decode_attention(q, k_buf, v_buf, fb.req_to_token, fb.req_pool_indices,
                                   self._seq_lens, layer.scale, num_splits,
                                   layer.sliding_window, layer.logit_softcap)
        else:
            out = extend_attention(q, k, v, k_buf, v_buf, fb.req_to_token, fb.req_pool_indices,
                                   self._prefix_lens, self._extend_lens, self._extend_start,
                                   layer.scale, self._max_extend_len, layer.sliding_window,
                                   layer.logit_softcap)
        return out.reshape(-1, self.num_heads * self.head_dim)
