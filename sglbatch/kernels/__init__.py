"""Triton kernels for the GPU path, each beside the plain-torch reference it is tested against.

- `kv_store`: writes a step's new K/V into their slots of the paged pool;
- `decode_attention`: one query token per request over its pooled K/V (GQA, split-KV);
- `extend_attention`: new tokens over a cached prefix in the pool plus themselves (causal);
- `rmsnorm`: RMSNorm, optionally fused with the residual add before it.

The pool layout is the engine's (`sglbatch.engine.kv_pool.KVPool`): per layer, K and V of
shape [kv_heads, slots + 1, head_dim], and a request -> slots table `req_to_token`.
Without a GPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, set before
these modules are imported): slow, but it runs the same kernel code on CPU tensors.
"""
