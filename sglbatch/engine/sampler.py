"""Batched next-token sampling: the logits pipeline (penalties, grammar masks, custom
processors), then greedy, temperature, top-k, top-p, min-p with per-request seeds, and the
logprobs of what was chosen."""

from __future__ import annotations

import functools

import torch

from sglbatch.engine.attention import cpu_kernels
from sglbatch.engine.custom_logit_processor import apply_custom_processors
from sglbatch.engine.grammar import apply_grammar_masks
from sglbatch.engine.logprobs import StepLogprobs, gather_step_logprobs
from sglbatch.engine.overlap import tensor_to_device
from sglbatch.engine.penalties import apply_penalties
from sglbatch.engine.request import Req

_MASK62 = (1 << 62) - 1


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style integer hash kept in [0, 2**62) so int64 shifts stay logical."""
    x = ((x ^ (x >> 31)) * 0x3F58476D1CE4E5B9) & _MASK62
    x = ((x ^ (x >> 29)) * 0x14057B7EF767814F) & _MASK62
    return x ^ (x >> 32)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise [batch, vocab] that depends only on (seed, step, token id).

    Counter-based rather than a stateful generator, so a request's samples do not depend on
    which other requests share its batch, or on being retracted and recomputed.
    """
    token = torch.arange(vocab_size, dtype=torch.int64, device=seeds.device)
    key = _mix((seeds & _MASK62) * 0x2545F491 + steps)
    h = _mix((key[:, None] + token[None, :] * 0x9E3779B1) & _MASK62)
    return ((h >> 38).to(torch.float64) + 0.5) / float(1 << 24)


class SamplingBatch:
    """The batch's sampling parameters, read once per step. The parameter tensors are built
    on first use: an all-greedy batch (the common case in batch jobs) needs none of them,
    and building them cost ~0.7 ms a step at batch 256."""

    def __init__(self, reqs: list[Req], vocab_size: int,
                 eos_token_ids: set[int] = frozenset(), device: str | torch.device = "cpu"):
        """`device`: where the logits live; the parameter tensors go there."""
        self.reqs = reqs
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.device = device
        self.params = [r.sampling_params for r in reqs]
        self.all_greedy = all(p.is_greedy for p in self.params)
        self.need_sort = not self.all_greedy and any(
            not p.is_greedy and (p.top_p < 1.0 or 0 < p.top_k < vocab_size or p.min_p > 0)
            for p in self.params)
        # Any penalty, length control, grammar or custom processor.
        self.needs_processing = any(
            r.processes_logits or r.output_len < p.min_new_tokens
            for r, p in zip(reqs, self.params))

    def _tensor(self, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
        return tensor_to_device(values, dtype, torch.device(self.device))

    @functools.cached_property
    def temperatures(self) -> torch.Tensor:  # [batch, 1]
        return self._tensor([[max(p.temperature, 1e-6)] for p in self.params])

    @functools.cached_property
    def top_ps(self) -> torch.Tensor:
        return self._tensor([p.top_p for p in self.params])

    @functools.cached_property
    def top_ks(self) -> torch.Tensor:
        return self._tensor([self.vocab_size if p.top_k == -1 else min(p.top_k, self.vocab_size)
                             for p in self.params])

    @functools.cached_property
    def min_ps(self) -> torch.Tensor:
        return self._tensor([p.min_p for p in self.params])

    @functools.cached_property
    def seeds(self) -> torch.Tensor:
        return self._tensor([r.seed for r in self.reqs], torch.int64)

    @functools.cached_property
    def steps(self) -> torch.Tensor:
        """Index of the token being sampled within each request's output."""
        return self._tensor([r.output_len for r in self.reqs], torch.int64)

    @functools.cached_property
    def is_greedy(self) -> torch.Tensor:  # [batch] bool
        return self._tensor([p.is_greedy for p in self.params])


def process_logits(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """What the sampler draws from: penalties and length controls, then grammar masks, then
    custom processors (SGLang's order). Returns fp32 logits when anything applied."""
    if not sb.needs_processing:
        return logits
    logits = logits.float()
    apply_penalties(logits, sb.reqs, sb.eos_token_ids)
    apply_grammar_masks(logits, [r.grammar for r in sb.reqs])
    apply_custom_processors(logits, sb.reqs)
    return logits


def sample(logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    """logits: [batch, vocab] in the model's dtype -> next token ids [batch] (int64)."""
    greedy = argmax_rows(logits)
    if sb.all_greedy:
        return greedy
    probs = torch.softmax(logits.float() / sb.temperatures, dim=-1)
    if sb.need_sort:
        probs = _filter_top_k_top_p_min_p(probs, sb)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (the Gumbel-max trick).
    noise = -torch.log(seeded_uniform(sb.seeds, sb.steps, probs.shape[-1])).to(probs.dtype)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(sb.is_greedy, greedy, sampled)


def output_logprobs(logits: torch.Tensor, next_ids: torch.Tensor,
                    sb: SamplingBatch) -> list[StepLogprobs | None]:
    """Logprobs of the chosen tokens for the requests that asked, as SGLang reports them:
    of the distribution sampled from (processed logits at the request's temperature; the
    raw scale for greedy requests), before top-k/top-p/min-p filtering."""
    rows = [i for i, r in enumerate(sb.reqs) if r.logprob_options is not None]
    result: list[StepLogprobs | None] = [None] * len(sb.reqs)
    if not rows:
        return result
    index = torch.tensor(rows, device=logits.device)
    temperatures = torch.where(sb.is_greedy[index, None], 1.0, sb.temperatures[index])
    logprobs = torch.log_softmax(logits[index].float() / temperatures, dim=-1)
    # Masked tokens would be -inf, which JSON cannot carry; SGLang clamps the same way.
    logprobs.clamp_(min=torch.finfo(torch.float32).min)
    steps = gather_step_logprobs(logprobs, next_ids[index],
                                 [sb.reqs[i].logprob_options for i in rows])
    for i, step in zip(rows, steps):
        result[i] = step
    return result


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Row-wise argmax (the first index of each row's maximum). On the CPU a C++ kernel reads
    the model's dtype directly: torch's bf16 argmax is 4x slower than fp32's, and widening
    256 x 49k logits to fp32 first cost ~8 ms a step, against ~0.6 ms for the kernel."""
    kernels = cpu_kernels.load("sampling") if logits.device.type == "cpu" else None
    if kernels is not None and logits.dtype in _KERNEL_DTYPES:
        return kernels.argmax_rows(logits.contiguous())
    return logits.argmax(dim=-1)


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _filter_top_k_top_p_min_p(probs: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)[None, :]
    drop = rank >= sb.top_ks[:, None]
    # Keep the smallest head whose mass reaches top_p (the token crossing the line stays).
    drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) > sb.top_ps[:, None]
    drop |= sorted_probs < sb.min_ps[:, None] * sorted_probs[:, :1]
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
