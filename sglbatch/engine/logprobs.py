"""Token logprobs as SGLang returns them: what a request asked for, what it has gathered,
and the gathering itself (one batched top-k and gather per step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

# (logprob, token id); the text is added when the output dict is built.
Entry = tuple[float | None, int]


@dataclass(frozen=True)
class LogprobOptions:
    """What `return_logprob=True` asked for."""

    start: int  # first input position with a logprob (SGLang's logprob_start_len, resolved)
    top_n: int = 0
    token_ids: tuple[int, ...] = ()
    with_text: bool = False

    @classmethod
    def resolve(cls, prompt_len: int, start: int | None, top_n: int | None,
                token_ids: list[int] | None, with_text: bool, vocab_size: int,
                where: str) -> LogprobOptions:
        # As SGLang: -1 (or None) means output logprobs only, which it counts as starting
        # at the last prompt token.
        start = prompt_len - 1 if start is None or start == -1 else start
        if not isinstance(start, int) or not 0 <= start < prompt_len:
            raise ValueError(f"{where}: logprob_start_len must be -1 or in [0, {prompt_len}) "
                             f"(the prompt has {prompt_len} tokens), got {start!r}")
        top_n = top_n or 0
        if not isinstance(top_n, int) or top_n < 0:
            raise ValueError(f"{where}: top_logprobs_num must be an integer >= 0, got {top_n!r}")
        ids = tuple(token_ids or ())
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{where}: token_ids_logprob has ids outside the vocabulary "
                             f"[0, {vocab_size}): {bad[:5]}")
        return cls(start, min(top_n, vocab_size), ids, with_text)


@dataclass
class StepLogprobs:
    """One position's logprobs: the chosen token's, the top ones, and the asked-for ids."""

    token: Entry
    top: list[Entry] | None = None
    ids: list[Entry] | None = None


@dataclass
class TokenLogprobs:
    """A request's gathered logprobs; input entries cover prompt tokens `start:`."""

    input: list[StepLogprobs] = field(default_factory=list)
    output: list[StepLogprobs] = field(default_factory=list)


def gather_step_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor,
                         options: list[LogprobOptions]) -> list[StepLogprobs]:
    """logprobs: [rows, vocab] fp32; chosen: [rows] token ids; one options per row."""
    values = logprobs.gather(1, chosen[:, None])[:, 0].tolist()
    max_top = max(o.top_n for o in options)
    if max_top:
        top_vals, top_ids = (t.tolist() for t in logprobs.topk(max_top, dim=-1))
    steps = []
    for row, (opts, value, token) in enumerate(zip(options, values, chosen.tolist())):
        step = StepLogprobs((value, token))
        if opts.top_n:
            step.top = list(zip(top_vals[row][:opts.top_n], top_ids[row][:opts.top_n]))
        if opts.token_ids:
            picked = logprobs[row, list(opts.token_ids)].tolist()
            step.ids = list(zip(picked, opts.token_ids))
        steps.append(step)
    return steps


def first_input_step(token: int) -> StepLogprobs:
    """The first prompt token has no context, so no logprobs (SGLang reports None)."""
    return StepLogprobs((None, token))


def meta_info_fields(options: LogprobOptions, record: TokenLogprobs, output_from: int,
                     decode: Callable[[int], str]) -> dict:
    """SGLang's logprob fields of `meta_info`; output entries from `output_from` on (streams
    send each token's logprobs once, with the token)."""

    def entries(items: list[Entry] | None) -> list | None:
        if items is None:
            return None
        return [[lp, tid, decode(tid) if options.with_text else None] for lp, tid in items]

    def fields(steps: list[StepLogprobs], name: str) -> dict:
        out = {f"{name}_token_logprobs": entries([s.token for s in steps])}
        if options.top_n:
            out[f"{name}_top_logprobs"] = [entries(s.top) for s in steps]
        if options.token_ids:
            out[f"{name}_token_ids_logprobs"] = [entries(s.ids) for s in steps]
        return out

    prompt = [s.token[0] for s in record.input if s.token[0] is not None]
    return {
        **fields(record.input, "input"),
        **fields(record.output[output_from:], "output"),
        "normalized_prompt_logprob": sum(prompt) / len(prompt) if prompt else None,
    }
