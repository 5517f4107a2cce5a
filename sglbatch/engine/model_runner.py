"""Owns the model and the attention backend and runs one batch forward. KV memory (pool,
prefix cache, req -> token table) is the CacheManager's, sized here for the model; the
runner only reads it."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from sglbatch.engine.attention import create_attention_backend, is_installed
from sglbatch.engine.batch import Batch, ForwardBatch, ForwardMode, StepResult
from sglbatch.engine.cache_manager import CacheManager
from sglbatch.engine.config import EngineConfig, ModelConfig
from sglbatch.engine.cuda_graph import CudaGraphRunner
from sglbatch.engine.kv_pool import KVPool, ReqToTokenPool
from sglbatch.engine.layers.compile import compile_elementwise
from sglbatch.engine.layers.linear import pack_linears
from sglbatch.engine.layers.norm import use_fused_kernel
from sglbatch.engine.loader import load_weights
from sglbatch.engine.logprobs import StepLogprobs, gather_step_logprobs
from sglbatch.engine.models import create_model
from sglbatch.engine.sampler import SamplingBatch, output_logprobs, process_logits, sample
from sglbatch.engine.trace import trace_range

logger = logging.getLogger(__name__)

_LOGPROB_ROWS = 512
_FORWARD_RANGES = {ForwardMode.EXTEND: "sglbatch.forward_extend",
                   ForwardMode.DECODE: "sglbatch.forward_decode"}


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path):
        self.config = config
        self.model_dir = model_dir
        self.device = torch.device(config.device)
        model_config = ModelConfig.from_dir(model_dir)
        self.context_len = config.context_length or model_config.max_position_embeddings
        # The rotary table must cover the context actually served.
        self.model_config = dataclasses.replace(
            model_config, max_position_embeddings=self.context_len)
        self.dtype = config.resolve_dtype()
        self.model = create_model(self.model_config)
        load_weights(self.model, model_dir, self.dtype)
        self.model.to(self.device).eval()
        if self.device.type == "cpu":
            pack_linears(self.model)
        elif is_installed("triton"):
            use_fused_kernel(self.model)  # residual add + RMSNorm in one kernel
        if config.enable_torch_compile:
            compile_elementwise(self.model)

        mc = self.model_config
        per_token = KVPool.bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads,
                                           mc.head_dim, self.dtype)
        num_slots = config.max_total_tokens or int(config.kv_cache_gb * (1 << 30) // per_token)
        self.memory = CacheManager(
            KVPool(num_slots, mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim,
                   self.dtype, self.device),
            # One extra row so a chunked request can hold one while the rest decode.
            ReqToTokenPool(config.max_running_requests + 1, self.context_len, self.device),
            radix_cache=not config.disable_radix_cache)
        self.attn_backend = create_attention_backend(
            config.attention_backend, config.device, self.kv_pool, mc.num_attention_heads,
            mc.num_key_value_heads, mc.head_dim)
        self.cuda_graph = self._capture_cuda_graphs()
        logger.info("model %s: %s, %d layers, dtype %s; KV pool %d tokens (%.2f GiB)",
                    model_dir.name, mc.architecture, mc.num_hidden_layers, self.dtype,
                    num_slots, num_slots * per_token / (1 << 30))

    def _capture_cuda_graphs(self) -> CudaGraphRunner | None:
        if self.device.type != "cuda" or self.config.disable_cuda_graph:
            return None
        if not self.attn_backend.supports_cuda_graph:
            logger.info("attention backend %s cannot be captured: decode runs without CUDA "
                        "graphs", type(self.attn_backend).__name__)
            return None
        max_bs = min(self.config.cuda_graph_max_bs, self.config.max_running_requests)
        return CudaGraphRunner(self.model, self.attn_backend, self.req_to_token_pool.table,
                               max_bs)

    @property
    def kv_pool(self) -> KVPool:
        return self.memory.kv_pool

    @property
    def req_to_token_pool(self) -> ReqToTokenPool:
        return self.memory.req_to_token

    @property
    def max_req_len(self) -> int:
        """Longest sequence (prompt + output) one request may reach, as SGLang computes it."""
        return min(self.context_len - 1, self.kv_pool.num_slots - 1)

    def build_forward_batch(self, batch: Batch) -> ForwardBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        prefix_lens = []
        for req, extend_len in zip(batch.reqs, batch.extend_lens):
            start = req.kv_len
            input_ids.extend(req.fill_ids[start:start + extend_len])
            positions.extend(range(start, start + extend_len))
            prefix_lens.append(start)
        extend_lens = batch.extend_lens
        seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
        starts = [0]
        for e in extend_lens[:-1]:
            starts.append(starts[-1] + e)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        return ForwardBatch(
            mode=batch.mode, input_ids=tensor(input_ids), positions=tensor(positions),
            out_cache_loc=batch.out_cache_loc.to(self.device),
            req_pool_indices=tensor([r.req_pool_idx for r in batch.reqs]),
            extend_lens=tensor(extend_lens), extend_start=tensor(starts),
            req_to_token=self.req_to_token_pool.table, seq_lens_cpu=seq_lens,
            prefix_lens_cpu=prefix_lens, extend_lens_cpu=list(extend_lens))

    @torch.inference_mode()
    def forward(self, batch: Batch, all_logits: bool = False) -> torch.Tensor:
        """Logits [batch, vocab] at each request's last new token, or [tokens, vocab] for
        every new token with `all_logits`, in the model's dtype."""
        with trace_range(_FORWARD_RANGES[batch.mode]):
            fb, hidden = self._hidden_states(batch)
            if not all_logits:
                hidden = hidden[fb.last_token_indices]
            return self.model.compute_logits(hidden)

    def _hidden_states(self, batch: Batch) -> tuple[ForwardBatch, torch.Tensor]:
        fb = self.build_forward_batch(batch)
        if self.cuda_graph is not None and self.cuda_graph.can_run(fb):
            return fb, self.cuda_graph.replay(fb)
        self.attn_backend.init_forward_metadata(fb)
        return fb, self.model(fb.input_ids, fb.positions, fb, self.attn_backend)

    @torch.inference_mode()
    def forward_and_sample(self, batch: Batch) -> StepResult:
        with trace_range(_FORWARD_RANGES[batch.mode]):
            fb, hidden = self._hidden_states(batch)
            logits = self.model.compute_logits(hidden[fb.last_token_indices])
        with trace_range("sglbatch.sample"):
            sb = SamplingBatch.from_reqs(batch.reqs, logits.shape[-1],
                                         self.model_config.eos_token_ids, logits.device)
            logits = process_logits(logits, sb)
            next_ids = sample(logits, sb)
            step_logprobs = output_logprobs(logits, next_ids, sb)
            next_ids = next_ids.tolist()
        with trace_range("sglbatch.input_logprobs"):
            input_logprobs = self._input_logprobs(batch, fb, hidden)
        return StepResult(next_ids, step_logprobs, input_logprobs)

    def _input_logprobs(self, batch: Batch, fb: ForwardBatch,
                        hidden: torch.Tensor) -> list[list[StepLogprobs]]:
        """Prompt-token logprobs from this step's hidden states, for requests that asked:
        raw logits (no temperature or penalties), as SGLang."""
        result: list[list[StepLogprobs]] = [[] for _ in batch.reqs]
        if batch.mode != ForwardMode.EXTEND:
            return result
        rows, targets, owners = [], [], []
        for i, (req, start) in enumerate(zip(batch.reqs, fb.extend_start.tolist())):
            for position in req.input_logprob_positions(batch.extend_lens[i]):
                rows.append(start + position - req.kv_len)
                targets.append(req.input_ids[position + 1])
                owners.append(i)
        # In pieces: each row's fp32 logprobs over the vocabulary take ~200 KB.
        for piece in range(0, len(rows), _LOGPROB_ROWS):
            sel = slice(piece, piece + _LOGPROB_ROWS)
            index = torch.tensor(rows[sel], device=hidden.device)
            logits = self.model.compute_logits(hidden[index]).float()
            steps = gather_step_logprobs(torch.log_softmax(logits, dim=-1),
                                         torch.tensor(targets[sel], device=self.device),
                                         [batch.reqs[i].logprob_options for i in owners[sel]])
            for owner, step in zip(owners[sel], steps):
                result[owner].append(step)
        return result
