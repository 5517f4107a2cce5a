"""A generation request as the scheduler and model runner see it."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sglbatch.engine.api_types import FinishReason
from sglbatch.engine.logprobs import LogprobOptions, TokenLogprobs
from sglbatch.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sglbatch.engine.grammar import Grammar
    from sglbatch.engine.ngram import NgramIndex


def derive_seed(seed: int, sample_index: int) -> int:
    """The seed of a prompt's `sample_index`-th parallel sample: the first keeps the user's
    seed; the others get distinct, reproducible ones."""
    if sample_index == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + sample_index * 0xBF58476D1CE4E5B9) % (1 << 62)


@dataclass(eq=False)
class Req:
    """One generation request as the scheduler sees it.

    Token layout: `fill_ids = input_ids + output_ids + pending_ids`. The first `kv_len` of
    them have their K/V in the pool (slots `req_to_token[req_pool_idx, :kv_len]`); the rest
    still need a forward pass. A decode step always has exactly one token to compute: the
    last one sampled. Of the `kv_len` slots, the first `tree_len` belong to the radix cache,
    the rest to the request itself.

    `pending_ids` are tokens sampled by a step whose results the host has not read yet (the
    overlap schedule runs the next step first): placeholders that the model runner resolves
    on the device (`FutureTokenMap`). At most two: the step being read and the one after it.
    """

    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    req_pool_idx: int | None = None
    kv_len: int = 0
    tree_len: int = 0  # leading slots owned by the prefix cache (locked through `tree_node`)
    tree_node: Any = None  # deepest radix-cache node this request has locked
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    finish_reason: FinishReason | None = None
    seed: int = 0  # the sampling seed actually used (random when the user gave none)
    logprob_options: LogprobOptions | None = None  # set when the caller asked for logprobs
    logprobs: TokenLogprobs = field(default_factory=TokenLogprobs)
    grammar: Grammar | None = None
    custom_logit_processor: Any = None
    draft_index: NgramIndex | None = None  # speculative decoding: made on first use

    @property
    def fill_ids(self) -> list[int]:
        return self.input_ids + self.output_ids + self.pending_ids

    def fill_span(self, start: int, end: int) -> list[int]:
        """`fill_ids[start:end]` without building `fill_ids`: a decode step reads one token
        of each request, and copying whole sequences for it cost O(context) per step."""
        n_in = len(self.input_ids)
        n_sampled = n_in + len(self.output_ids)
        if end <= n_in:
            return self.input_ids[start:end]
        if start >= n_sampled:
            return self.pending_ids[start - n_sampled:end - n_sampled]
        if start >= n_in and end <= n_sampled:
            return self.output_ids[start - n_in:end - n_in]
        return self.fill_ids[start:end]  # across parts: a recomputed request's prefill

    @property
    def fill_len(self) -> int:
        return len(self.input_ids) + self.output_len

    @property
    def output_len(self) -> int:
        """Tokens sampled so far, including those whose values are still on the device."""
        return len(self.output_ids) + len(self.pending_ids)

    @property
    def pending_len(self) -> int:
        """Tokens that still need a forward pass before the next token can be sampled."""
        return self.fill_len - self.kv_len

    @functools.cached_property
    def processes_logits(self) -> bool:
        """Whether penalties, a grammar or a custom processor change this request's logits
        (each reads its sampled tokens)."""
        return (self.sampling_params.has_penalties or self.grammar is not None or
                self.custom_logit_processor is not None)

    @functools.cached_property
    def reads_sampled_tokens(self) -> bool:
        """Whether scheduling this request's next step needs its last token's value on the
        host (grammar state, penalty counts, custom processors, logprob bookkeeping): the
        overlap schedule then reads a step's results before it schedules the next."""
        return self.processes_logits or self.logprob_options is not None

    @property
    def can_speculate(self) -> bool:
        """Whether drafts can be checked against this request's next tokens: a greedy pick
        from raw logits (no logprobs to report for drafted positions either)."""
        params = self.sampling_params
        return (params.is_greedy and not self.processes_logits and self.logprob_options is None
                and self.output_len >= params.min_new_tokens)

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def next_input_logprob_position(self) -> int | None:
        """The position whose logits give the next missing input logprob (that of the token
        after it), or None when the request needs no more input logprobs."""
        opts = self.logprob_options
        if opts is None:
            return None
        next_token = opts.start + len(self.logprobs.input)
        if next_token >= len(self.input_ids):
            return None
        return max(next_token, 1) - 1

    def input_logprob_positions(self, extend_len: int) -> range:
        """Positions among this step's new tokens that give input logprobs. The scheduler
        keeps the cached prefix short enough that none of them was skipped."""
        first = self.next_input_logprob_position
        if first is None:
            return range(0)
        assert first >= self.kv_len, "input logprobs needed from a cached position"
        return range(first, min(self.kv_len + extend_len, len(self.input_ids) - 1))
