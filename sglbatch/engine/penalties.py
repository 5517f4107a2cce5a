"""Penalties and length controls, applied to the logits of a whole batch at once.

Semantics follow SGLang (and through it OpenAI and transformers):
- frequency_penalty: minus penalty x how often the token was generated so far;
- presence_penalty: minus penalty if the token was generated at all;
- repetition_penalty: tokens seen in the prompt or the output have positive logits divided
  and negative logits multiplied by it;
- logit_bias: added to the named tokens;
- min_new_tokens: EOS and stop_token_ids are impossible until that many tokens exist.
"""

from __future__ import annotations

import torch

from sglbatch.engine.request import Req


def apply_penalties(logits: torch.Tensor, reqs: list[Req], eos_token_ids: set[int]) -> None:
    """Adjust fp32 `logits` [batch, vocab] in place for the requests that ask for it."""
    rows = [i for i, r in enumerate(reqs) if r.sampling_params.has_penalties]
    if rows:
        _apply_token_penalties(logits, [reqs[i] for i in rows],
                               torch.tensor(rows, device=logits.device))
    for i, req in enumerate(reqs):
        params = req.sampling_params
        if req.output_len < params.min_new_tokens:
            banned = (set() if params.ignore_eos else eos_token_ids) | set(params.stop_token_ids)
            logits[i, sorted(banned)] = float("-inf")


def _apply_token_penalties(logits: torch.Tensor, reqs: list[Req], rows: torch.Tensor) -> None:
    vocab, device = logits.shape[-1], logits.device
    params = [r.sampling_params for r in reqs]
    sub = logits[rows]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=device)[:, None]

    if any(p.frequency_penalty or p.presence_penalty for p in params):
        counts = _token_counts([r.output_ids for r in reqs], vocab, device)
        frequency = column([p.frequency_penalty for p in params])
        presence = column([p.presence_penalty for p in params])
        sub -= frequency * counts + presence * (counts > 0)
    if any(p.repetition_penalty != 1.0 for p in params):
        seen = _token_counts([r.fill_ids for r in reqs], vocab, device) > 0
        penalty = column([p.repetition_penalty for p in params])
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    for row, p in enumerate(params):
        if p.logit_bias:
            ids = list(p.logit_bias)
            sub[row, ids] += torch.tensor(list(p.logit_bias.values()), device=device)
    logits[rows] = sub


def _token_counts(token_lists: list[list[int]], vocab: int,
                  device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] fp32 occurrence counts on `device`; padding lands in a
    dropped column. The ids are padded on the host and copied over once."""
    width = max((len(t) for t in token_lists), default=0)
    padded = [tokens + [vocab] * (width - len(tokens)) for tokens in token_lists]
    ids = torch.tensor(padded, dtype=torch.int64, device=device).view(len(token_lists), width)
    counts = torch.zeros(len(token_lists), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    return counts[:, :vocab]
