"""A scheduled batch (`Batch`, scheduler side) and its tensors (`ForwardBatch`, model side)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from sglbatch.engine.logprobs import StepLogprobs
from sglbatch.engine.request import Req


class ForwardMode(enum.Enum):
    EXTEND = "extend"  # prompt (or recomputed) tokens, possibly on top of a cached prefix
    DECODE = "decode"  # exactly one new token per request


@dataclass(eq=False)
class Batch:
    """What the scheduler decided to run this step."""

    mode: ForwardMode
    reqs: list[Req]
    extend_lens: list[int]  # new tokens per request this step (all 1 for decode)
    out_cache_loc: torch.Tensor  # KV slot of every new token, in batch order

    def samples(self, i: int) -> bool:
        """Whether request `i` gets a next token from this step (not a mid-prompt chunk)."""
        req = self.reqs[i]
        return req.kv_len + self.extend_lens[i] == req.fill_len


@dataclass
class StepResult:
    """What one forward pass produced for each request of the batch."""

    next_ids: list[int]  # meaningless for a request mid-prompt (see `Batch.samples`)
    output_logprobs: list[StepLogprobs | None]
    input_logprobs: list[list[StepLogprobs]]  # this step's share of each prompt's logprobs


@dataclass(eq=False)
class ForwardBatch:
    """Device tensors for one forward pass over a ragged, flattened batch.

    Tokens of all requests are concatenated: request `i` owns rows
    `extend_start[i] : extend_start[i] + extend_lens[i]` of `input_ids`/`positions`.
    Its K/V after this step lives in `req_to_token[req_pool_indices[i], :seq_lens_cpu[i]]`,
    of which the first `prefix_lens_cpu[i]` were already in the pool before the step.
    """

    mode: ForwardMode
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    out_cache_loc: torch.Tensor  # [num_tokens] slot each new token's K/V is written to
    req_pool_indices: torch.Tensor  # [batch]
    extend_lens: torch.Tensor  # [batch]
    extend_start: torch.Tensor  # [batch]
    req_to_token: torch.Tensor  # [rows, max_context_len]
    # CPU copies for backends that loop or size buffers in Python.
    seq_lens_cpu: list[int]
    prefix_lens_cpu: list[int]
    extend_lens_cpu: list[int]

    @property
    def last_token_indices(self) -> torch.Tensor:
        """Row of each request's last token: the one whose logits predict the next token."""
        return self.extend_start + self.extend_lens - 1
