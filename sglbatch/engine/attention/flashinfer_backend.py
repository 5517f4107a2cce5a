"""The FlashInfer backend (flashinfer-python, CUDA only), imported only when chosen.

FlashInfer reads a paged cache through an index list per request. The pool is viewed as
pages of one token in its "NHD" layout ([pages, page_size=1, kv_heads, head_dim]): a
strided view of the head-major buffers, which FlashInfer accepts without a copy. New K/V
are stored first, so both extend and decode attend each request's whole row of slots
(extend with FlashInfer's causal mask, aligned to the end of the sequence).

A wrapper takes the softmax scale, the window and the soft-cap when it is planned, not when
it runs, so each distinct `LayerAttention` of the model (Gemma 2: a sliding and a full one)
gets its own pair of wrappers, planned once per forward.
"""

from __future__ import annotations

import torch

from sglbatch.engine.attention.base import AttentionBackend
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.overlap import tensor_to_device

WORKSPACE_BYTES = 128 << 20  # FlashInfer's scratch for split-KV partial results


def _import_flashinfer():
    try:
        import flashinfer
    except ImportError as e:
        raise ValueError("attention_backend='flashinfer' needs flashinfer-python "
                         "(pip install 'sglbatch[gpu]'); or use attention_backend='triton'"
                         ) from e
    return flashinfer


def one_token_pages(buf: torch.Tensor) -> torch.Tensor:
    """A pool buffer [kv_heads, slots, dim] as FlashInfer's NHD pages of one token,
    [slots, 1, kv_heads, dim], without a copy. The size-1 axis gets the page stride:
    FlashInfer's Hopper prefill turns page strides into token offsets assuming one divides
    the other (flashinfer#702), which a plain unsqueeze would not give."""
    heads, slots, dim = buf.shape
    return buf.as_strided((slots, 1, heads, dim), (dim, dim, buf.stride(0), 1))


class FlashInferBackend(AttentionBackend):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        flashinfer = _import_flashinfer()
        device = self.kv_pool.k_buffers[0].device
        if device.type != "cuda":
            raise ValueError("attention_backend='flashinfer' needs device='cuda'")
        if self.kv_pool.k_buffers[0].dtype == torch.float32:
            raise ValueError("attention_backend='flashinfer' runs float16/bfloat16 only; use "
                             "dtype='bfloat16' or attention_backend='triton'")
        # One scratch for all wrappers: they run one after another on the stream.
        workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrappers = {
            layer: (flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                        workspace, "NHD",
                        # Tensor cores pay off once several query heads share a kv head.
                        use_tensor_cores=self.num_heads // self.num_kv_heads >= 4),
                    flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD"))
            for layer in dict.fromkeys(self.layers)}

    def _pages(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (one_token_pages(self.kv_pool.k_buffers[layer_id]),
                one_token_pages(self.kv_pool.v_buffers[layer_id]))

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        device = fb.req_to_token.device
        seq_lens = tensor_to_device(fb.seq_lens_cpu, torch.int32, device)
        kv_indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32, device=device)
        kv_indptr[1:] = torch.cumsum(seq_lens, 0)
        rows = fb.req_to_token[fb.req_pool_indices, :max(fb.seq_lens_cpu)]
        used = torch.arange(rows.shape[1], device=device)[None, :] < seq_lens[:, None]
        kv_indices = rows[used].to(torch.int32)
        last_page_len = torch.ones_like(seq_lens)  # pages of one token are always full
        dtype = self.kv_pool.k_buffers[0].dtype
        # Heads, head_dim and page size positionally: their keyword names vary by version.
        shape = (self.num_heads, self.num_kv_heads, self.head_dim, 1)
        if fb.mode != ForwardMode.DECODE:
            qo_indptr = torch.zeros_like(kv_indptr)
            qo_indptr[1:] = torch.cumsum(fb.extend_lens.to(torch.int32), 0)
        for layer, (decode, prefill) in self._wrappers.items():
            # window_left counts the keys left of the query's own: -1 is no window.
            per_layer = dict(sm_scale=layer.scale, logits_soft_cap=layer.logit_softcap,
                             window_left=(layer.sliding_window or 0) - 1,
                             q_data_type=dtype, kv_data_type=dtype)
            if fb.mode == ForwardMode.DECODE:
                decode.plan(kv_indptr, kv_indices, last_page_len, *shape, **per_layer)
            else:
                prefill.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, *shape,
                             causal=True, **per_layer)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                fb: ForwardBatch) -> torch.Tensor:
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        self.store_kv(layer_id, fb, k, v)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        decode, prefill = self._wrappers[self.layers[layer_id]]
        wrapper = decode if fb.mode == ForwardMode.DECODE else prefill
        out = wrapper.run(q, self._pages(layer_id))
        return out.reshape(-1, self.num_heads * self.head_dim)
