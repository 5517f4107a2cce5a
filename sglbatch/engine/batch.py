"""A scheduled batch (`Batch`, scheduler side), its forward inputs as host values
(`StepInputs`, what tensor-parallel rank 0 sends the others) and its tensors (`ForwardBatch`,
model side)."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

import torch

from sglbatch.engine.logprobs import StepLogprobs
from sglbatch.engine.overlap import tensor_to_device, to_device
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
    # Set when the step is launched: the rows that get a token (not mid-prompt chunks).
    completes: list[bool] = field(default_factory=list)
    # A verify step (speculative decoding): each request's drafted tokens, run after its
    # last sampled token as an extend of 1 + len(draft) tokens. None for other steps.
    drafts: list[list[int]] | None = None
    accepted_drafts: int = 0  # set when a verify step's results are read

    @property
    def is_verify(self) -> bool:
        return self.drafts is not None

    @property
    def token_starts(self) -> list[int]:
        """Where each request's tokens start among the step's, then the step's token count."""
        return list(itertools.accumulate(self.extend_lens, initial=0))

    @property
    def step_kind(self) -> str:
        """extend | decode | verify: how the engine's step statistics file the step."""
        return "verify" if self.is_verify else self.mode.value

    def samples(self, i: int) -> bool:
        """Whether request `i` gets a next token from this step (not a mid-prompt chunk);
        read before the step is launched."""
        req = self.reqs[i]
        return req.kv_len + self.extend_lens[i] == req.fill_len


@dataclass
class StepResult:
    """What one forward pass produced for each request of the batch."""

    next_ids: list[int]  # meaningless for a request mid-prompt (see `Batch.samples`)
    output_logprobs: list[StepLogprobs | None]
    input_logprobs: list[list[StepLogprobs]]  # this step's share of each prompt's logprobs
    # A verify step: per request, the greedy token after each of its drafts.
    draft_targets: list[list[int]] | None = None


@dataclass(eq=False)
class LaunchedStep:
    """A step whose forward and sampling are queued on the device."""

    placeholders: list[int]  # one per row, standing for its sampled token until it is read
    next_ids: torch.Tensor  # on the host (CUDA: a pinned copy that `ready` marks complete)
    ready: torch.cuda.Event | None
    output_logprobs: list[StepLogprobs | None]
    input_logprobs: list[list[StepLogprobs]]
    draft_targets: list[list[int]] | None = None  # see StepResult (read on launch)

    @classmethod
    def start(cls, next_ids: torch.Tensor, placeholders: list[int],
              output_logprobs: list[StepLogprobs | None],
              input_logprobs: list[list[StepLogprobs]],
              draft_targets: list[list[int]] | None = None) -> LaunchedStep:
        ready = None
        if next_ids.device.type == "cuda":
            host = torch.empty(next_ids.shape, dtype=next_ids.dtype, device="cpu",
                               pin_memory=True)
            next_ids = host.copy_(next_ids, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        return cls(placeholders, next_ids, ready, output_logprobs, input_logprobs,
                   draft_targets)

    def result(self) -> StepResult:
        """Wait for the step and read its tokens."""
        if self.ready is not None:
            self.ready.synchronize()
        return StepResult(self.next_ids.tolist(), self.output_logprobs, self.input_logprobs,
                          self.draft_targets)


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


@dataclass(eq=False)
class StepInputs:
    """One forward pass's inputs on the host: all a rank needs to run its shard of the step.
    Small enough to send every step: the req -> token table is not in it, only the entries
    changed since the previous step (`table_changes`, for the other ranks' copies)."""

    mode: ForwardMode
    input_ids: list[int]
    prefix_lens: list[int]  # tokens of each request already in the pool
    extend_lens: list[int]
    out_cache_loc: torch.Tensor  # on the host
    req_pool_indices: list[int]
    all_logits: bool = False  # logits for every new token, not only each request's last
    logprob_rows: list[int] = field(default_factory=list)  # rows that owe input logprobs
    table_changes: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def to_forward_batch(self, device: torch.device, req_to_token: torch.Tensor) -> ForwardBatch:
        positions: list[int] = []
        starts = [0]
        for prefix_len, extend_len in zip(self.prefix_lens, self.extend_lens):
            positions.extend(range(prefix_len, prefix_len + extend_len))
            starts.append(starts[-1] + extend_len)

        def tensor(values: list[int]) -> torch.Tensor:
            return tensor_to_device(values, torch.int64, device)

        return ForwardBatch(
            mode=self.mode, input_ids=tensor(self.input_ids), positions=tensor(positions),
            out_cache_loc=to_device(self.out_cache_loc, device),
            req_pool_indices=tensor(self.req_pool_indices),
            extend_lens=tensor(self.extend_lens), extend_start=tensor(starts[:-1]),
            req_to_token=req_to_token,
            seq_lens_cpu=[p + e for p, e in zip(self.prefix_lens, self.extend_lens)],
            prefix_lens_cpu=list(self.prefix_lens), extend_lens_cpu=list(self.extend_lens))
