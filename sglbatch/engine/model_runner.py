"""Owns the model and the attention backend and runs one batch forward. KV memory (pool,
prefix cache, req -> token table) is the CacheManager's, sized here for the model; the
runner only reads it.

Under tensor parallelism every rank has a runner over its shard of the model. Rank 0's
(`peers` set) is the engine's: it sends each step's inputs to the other ranks, runs its part
of the forward with them and alone samples; the others `follow` (parallel/worker.py)."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sglbatch.engine.attention import create_attention_backend, is_installed
from sglbatch.engine.batch import (
    Batch,
    ForwardBatch,
    ForwardMode,
    LaunchedStep,
    StepInputs,
    StepResult,
)
from sglbatch.engine.cache_manager import CacheManager
from sglbatch.engine.config import EngineConfig, ModelConfig
from sglbatch.engine.cuda_graph import CudaGraphRunner
from sglbatch.engine.kv_pool import KVPool, ReqToTokenPool
from sglbatch.engine.layers.compile import compile_elementwise
from sglbatch.engine.layers.fused_cpu import use_fused_cpu_ops
from sglbatch.engine.layers.linear import make_batch_invariant, pack_linears
from sglbatch.engine.layers.moe import pack_experts
from sglbatch.engine.layers.norm import use_fused_kernel
from sglbatch.engine.loader import load_weights
from sglbatch.engine.logprobs import StepLogprobs, gather_step_logprobs
from sglbatch.engine.models import create_model
from sglbatch.engine.overlap import FutureTokenMap
from sglbatch.engine.parallel.group import RankLost, TPGroup, rank_device
from sglbatch.engine.parallel.shard import plan_shards
from sglbatch.engine.sampler import (
    SamplingBatch,
    argmax_rows,
    output_logprobs,
    process_logits,
    sample,
)
from sglbatch.engine.trace import trace_range

if TYPE_CHECKING:
    from sglbatch.engine.parallel.peers import Peers

logger = logging.getLogger(__name__)

_LOGPROB_ROWS = 512
_FORWARD_RANGES = {ForwardMode.EXTEND: "sglbatch.forward_extend",
                   ForwardMode.DECODE: "sglbatch.forward_decode"}


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path, group: TPGroup | None = None,
                 peers: Peers | None = None):
        """Without `group`, the whole model on one device. With one, this rank's shard;
        rank 0 also gets `peers`, the other ranks' processes."""
        self.config = config
        self.model_dir = model_dir
        self.group, self.peers = group, peers
        rank = group.rank if group is not None else 0
        self.device = rank_device(config.device, config.base_gpu_id, rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # per thread: streams and graphs use it
        model_config = ModelConfig.from_dir(model_dir)
        self.context_len = config.context_length or model_config.max_position_embeddings
        # The rotary table must cover the context actually served.
        self.model_config = dataclasses.replace(
            model_config, max_position_embeddings=self.context_len)
        self.dtype = config.resolve_dtype()
        shards = plan_shards(self.model_config, group.size if group is not None else 1)
        self.shard = shards[rank]
        self.model = create_model(self.model_config, self.shard, group)
        load_weights(self.model, model_dir, self.dtype)
        self.model.to(self.device).eval()
        if self.device.type == "cpu":
            pack_linears(self.model)
            pack_experts(self.model)
            use_fused_cpu_ops(self.model, self.dtype)  # norm, and rope with the K/V store
            if config.enable_deterministic_inference:
                make_batch_invariant(self.model)
        elif is_installed("triton"):
            use_fused_kernel(self.model)  # residual add + RMSNorm in one kernel
        if config.enable_torch_compile:
            compile_elementwise(self.model)

        mc = self.model_config
        # Every rank must have the same slots (rank 0 hands them out): kv_cache_gb is per
        # rank, sized for the rank holding the most KV heads.
        per_token = KVPool.bytes_per_token(mc.num_hidden_layers,
                                           max(s.num_kv_heads for s in shards), mc.head_dim,
                                           self.dtype)
        num_slots = config.max_total_tokens or int(config.kv_cache_gb * (1 << 30) // per_token)
        self.memory = CacheManager(
            KVPool(num_slots, mc.num_hidden_layers, self.shard.num_kv_heads, mc.head_dim,
                   self.dtype, self.device),
            # One extra row so a chunked request can hold one while the rest decode.
            ReqToTokenPool(config.max_running_requests + 1, self.context_len, self.device,
                           mirrored=peers is not None),
            radix_cache=not config.disable_radix_cache and rank == 0)
        self.attn_backend = create_attention_backend(
            "deterministic" if config.enable_deterministic_inference else
            config.attention_backend, config.device, self.kv_pool, self.shard.num_q_heads,
            self.shard.num_kv_heads, mc.head_dim, self.model.attention_layers())
        self.cuda_graph = self._capture_cuda_graphs()
        # A step samples one token per request at most; +1: a chunked request's row.
        self.future_tokens = FutureTokenMap(config.max_running_requests + 1, self.device)
        logger.info("model %s: %s, %d layers, dtype %s; KV pool %d tokens (%.2f GiB)%s",
                    model_dir.name, mc.architecture, mc.num_hidden_layers, self.dtype,
                    num_slots, num_slots * per_token / (1 << 30),
                    f"; tp rank {rank}/{self.shard.size}: {self.shard.num_q_heads} q heads, "
                    f"{self.shard.num_kv_heads} kv heads" if group is not None else "")

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

    def step_inputs(self, batch: Batch, all_logits: bool = False
                    ) -> tuple[StepInputs, list[tuple[int, int]]]:
        """The step's inputs, and for each row that owes an input logprob its (request, target
        token). Rank 0 of a tensor-parallel engine adds the table entries changed since the
        last step."""
        input_ids: list[int] = []
        prefix_lens: list[int] = []
        rows: list[int] = []
        targets: list[tuple[int, int]] = []
        for i, (req, extend_len) in enumerate(zip(batch.reqs, batch.extend_lens)):
            start = req.kv_len
            if batch.is_verify:  # the last sampled token, then the drafts
                input_ids.extend(req.fill_span(start, start + 1))
                input_ids.extend(batch.drafts[i])
                prefix_lens.append(start)
                continue
            if batch.mode == ForwardMode.EXTEND:
                for position in req.input_logprob_positions(extend_len):
                    rows.append(len(input_ids) + position - start)
                    targets.append((i, req.input_ids[position + 1]))
            input_ids.extend(req.fill_span(start, start + extend_len))
            prefix_lens.append(start)
        changes = self.req_to_token_pool.take_unsent() if self.peers is not None else None
        inputs = StepInputs(batch.mode, input_ids, prefix_lens, list(batch.extend_lens),
                            batch.out_cache_loc, [r.req_pool_idx for r in batch.reqs],
                            all_logits, rows, changes)
        return inputs, targets

    @torch.inference_mode()
    def forward(self, batch: Batch, all_logits: bool = False) -> torch.Tensor:
        """Logits [batch, vocab] at each request's last new token, or [tokens, vocab] for
        every new token with `all_logits`, in the model's dtype."""
        inputs, _ = self.step_inputs(batch, all_logits)
        with self._in_step():
            self._send(inputs)
            return self._forward(inputs)[1]

    def forward_and_sample(self, batch: Batch) -> StepResult:
        """`launch`, then wait for its results."""
        return self.launch(batch).result()

    @torch.inference_mode()
    def launch(self, batch: Batch) -> LaunchedStep:
        """Queue the step's forward and sampling. On a GPU the host goes on (the overlap
        schedule prepares the next step) while the device runs them; the sampled ids stay
        there too, in the future map, for the next step's inputs to name by placeholder."""
        with trace_range("sglbatch.prepare"):
            inputs, targets = self.step_inputs(batch, all_logits=batch.is_verify)
        # Every collective of the step (the forward, then the input logprobs' logits) comes
        # before sampling, so a failed sample leaves the ranks in step.
        with self._in_step():
            self._send(inputs)
            hidden, logits = self._forward(inputs)
            with trace_range("sglbatch.input_logprobs"):
                input_logprobs = self._input_logprobs(batch, hidden, inputs.logprob_rows,
                                                      targets)
        with trace_range("sglbatch.sample"):
            draft_targets = None
            if batch.is_verify:
                logits, draft_targets = self._split_verify_logits(batch, logits)
            sb = SamplingBatch(batch.reqs, logits.shape[-1], self.model_config.eos_token_ids,
                               logits.device)
            logits = process_logits(logits, sb)
            next_ids = sample(logits, sb)
            step_logprobs = output_logprobs(logits, next_ids, sb)
            placeholders = self.future_tokens.store(next_ids)
            return LaunchedStep.start(next_ids, placeholders, step_logprobs, input_logprobs,
                                      draft_targets)

    def _split_verify_logits(self, batch: Batch, logits: torch.Tensor
                             ) -> tuple[torch.Tensor, list[list[int]]]:
        """A verify step's logits at every token -> (those at each request's last sampled
        token, sampled as in a decode step; the greedy token after each of its drafts)."""
        starts = batch.token_starts
        greedy = argmax_rows(logits).tolist()
        targets = [greedy[start + 1:end] for start, end in itertools.pairwise(starts)]
        first = torch.tensor(starts[:-1], device=logits.device)
        return logits[first], targets

    @torch.inference_mode()
    def follow(self, inputs: StepInputs) -> None:
        """A worker rank's part of the step rank 0 sent: every collective rank 0 runs, in
        the same order."""
        self.req_to_token_pool.apply(inputs.table_changes)
        hidden, _ = self._forward(inputs)
        for _ in self._logits_in_pieces(hidden, inputs.logprob_rows):
            pass

    def _forward(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states of every new token, logits at each request's last one or at every
        token; None on ranks other than 0)."""
        with trace_range(_FORWARD_RANGES[inputs.mode]):
            with trace_range("sglbatch.prepare"):
                fb = inputs.to_forward_batch(self.device, self.req_to_token_pool.table)
                if inputs.input_ids and min(inputs.input_ids) < 0:  # tokens not read yet
                    fb.input_ids = self.future_tokens.resolve(fb.input_ids)
            hidden = self._hidden_states(fb)
            rows = hidden if inputs.all_logits else hidden[fb.last_token_indices]
            return hidden, self.model.compute_logits(rows)

    def _hidden_states(self, fb: ForwardBatch) -> torch.Tensor:
        if self.cuda_graph is not None and self.cuda_graph.can_run(fb):
            return self.cuda_graph.replay(fb)
        with trace_range("sglbatch.prepare"):
            self.attn_backend.init_forward_metadata(fb)
        return self.model(fb.input_ids, fb.positions, fb, self.attn_backend)

    def _send(self, inputs: StepInputs) -> None:
        if self.peers is not None:
            self.peers.send(inputs)

    @contextmanager
    def _in_step(self) -> Iterator[None]:
        """Tensor parallel: a failure once the step was sent leaves the ranks out of step
        (some wait in a collective the others will never join), so the group is closed and
        the failure is fatal (RankLost)."""
        if self.peers is None:
            yield
            return
        if self.peers.lost is not None:
            raise RankLost(self.peers.lost)
        try:
            yield
        except Exception as error:
            raise RankLost(self.peers.fail(error)) from error

    def close(self) -> None:
        """Stop the other ranks and leave the process group (tensor parallel)."""
        if self.peers is not None:
            self.peers.close()
        if self.group is not None:
            self.group.close()

    def _logits_in_pieces(self, hidden: torch.Tensor,
                          rows: list[int]) -> Iterator[torch.Tensor | None]:
        """Logits of `rows` of `hidden`, in pieces: each row's fp32 logprobs over the
        vocabulary take ~200 KB. Every rank iterates it (each piece gathers logits)."""
        for piece in range(0, len(rows), _LOGPROB_ROWS):
            index = torch.tensor(rows[piece:piece + _LOGPROB_ROWS], device=hidden.device)
            yield self.model.compute_logits(hidden[index])

    def _input_logprobs(self, batch: Batch, hidden: torch.Tensor, rows: list[int],
                        targets: list[tuple[int, int]]) -> list[list[StepLogprobs]]:
        """Prompt-token logprobs from this step's hidden states, for requests that asked:
        raw logits (no temperature or penalties), as SGLang."""
        result: list[list[StepLogprobs]] = [[] for _ in batch.reqs]
        pieces = self._logits_in_pieces(hidden, rows)
        for start, logits in zip(range(0, len(rows), _LOGPROB_ROWS), pieces):
            piece = targets[start:start + _LOGPROB_ROWS]
            steps = gather_step_logprobs(
                torch.log_softmax(logits.float(), dim=-1),
                torch.tensor([t for _, t in piece], device=self.device),
                [batch.reqs[i].logprob_options for i, _ in piece])
            for (owner, _), step in zip(piece, steps):
                result[owner].append(step)
        return result
