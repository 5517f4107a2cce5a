"""Reference attention on plain torch (SDPA over gathered KV): the CPU path and the oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglbatch.engine.attention.base import AttentionBackend
from sglbatch.engine.batch import ForwardBatch, ForwardMode


class TorchNativeBackend(AttentionBackend):
    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        if fb.mode == ForwardMode.DECODE:
            # One padded gather for the whole batch: [batch, max_len] slot ids plus a mask that
            # hides the padding (padding rows point at whatever the table holds; masked out).
            max_len = max(fb.seq_lens_cpu)
            self._decode_slots = fb.req_to_token[fb.req_pool_indices, :max_len].reshape(-1)
            self._decode_shape = (fb.batch_size, max_len)
            arange = torch.arange(max_len, device=fb.seq_lens.device)
            self._decode_pad = (arange[None, :] >= fb.seq_lens[:, None])[None, :, None, :]
        else:
            self._extend_slots = []
            self._extend_masks = []
            for i, (prefix_len, seq_len) in enumerate(zip(fb.prefix_lens_cpu, fb.seq_lens_cpu)):
                row = fb.req_to_token[fb.req_pool_indices[i], :seq_len]
                self._extend_slots.append(row)
                # Query j sits at absolute position prefix_len + j and sees keys 0..that position.
                q_pos = torch.arange(prefix_len, seq_len)
                self._extend_masks.append(torch.arange(seq_len)[None, :] <= q_pos[:, None])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                fb: ForwardBatch) -> torch.Tensor:
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        self.kv_pool.set_kv(layer_id, fb.out_cache_loc, k, v)
        q = q.view(-1, self.num_heads, self.head_dim)
        if fb.mode == ForwardMode.DECODE:
            out = self._decode(q, layer_id)
        else:
            out = self._extend(q, k, v, layer_id, fb)
        return out.reshape(-1, self.num_heads * self.head_dim)

    def _decode(self, q: torch.Tensor, layer_id: int) -> torch.Tensor:
        # Batched matmuls over (kv head, request), the kv head's query heads as rows; SDPA's
        # CPU kernels are several times slower at query length 1 (bf16 most of all).
        batch, max_len = self._decode_shape
        group = self.num_heads // self.num_kv_heads
        k, v = self.kv_pool.get_kv(layer_id, self._decode_slots)
        k = k.view(self.num_kv_heads, batch, max_len, self.head_dim)
        v = v.view(self.num_kv_heads, batch, max_len, self.head_dim)
        q = q.view(batch, self.num_kv_heads, group, self.head_dim).transpose(0, 1)
        scores = torch.matmul(q, k.transpose(-1, -2)).float().mul_(self.scale)
        probs = torch.softmax(scores.masked_fill_(self._decode_pad, float("-inf")), dim=-1)
        out = torch.matmul(probs.to(v.dtype), v)  # [kv_heads, batch, group, head_dim]
        return out.transpose(0, 1).reshape(batch, self.num_heads, self.head_dim)

    def _extend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int,
                fb: ForwardBatch) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for i, ext_len in enumerate(fb.extend_lens_cpu):
            end = start + ext_len
            if fb.prefix_lens_cpu[i] == 0:
                # Nothing cached: the step's own K/V is the whole sequence, no gather needed.
                k_i, v_i = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
                mask, causal = None, True
            else:
                k_i, v_i = self.kv_pool.get_kv(layer_id, self._extend_slots[i])
                mask, causal = self._extend_masks[i], False
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k_i, v_i,
                attn_mask=mask, is_causal=causal, scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads).transpose(0, 1)
            start = end
        return out
