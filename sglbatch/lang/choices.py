"""How `select` picks among choices from their logprobs (SGLang-compatible).

Each method receives, per choice, the token logprobs of the choice text
conditioned on the prompt (``input_token_logprobs``: a list, per choice, of
``(logprob, token_id, token_text_or_None)`` tuples/lists) and the mean of those
(``normalized_prompt_logprobs``). ``UnconditionalLikelihoodNormalized`` also
needs the logprobs of each choice *without* the prompt.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np


def compute_normalized_prompt_logprobs(input_logprobs: list) -> float:
    """The mean of the known (non-None, non-zero) logprobs, as SGLang computes it."""
    values = [x[0] for x in input_logprobs if x[0]]
    return sum(values) / len(values) if values else 0.0


def score_choices(prefix: str, input_token_logprobs: list[list[Any]]
                  ) -> tuple[list[list[Any]], list[float]]:
    """Each choice's input token logprobs (scored from one token before the choice, room for
    token healing) and their mean; where no healing happened (the prefix's last token
    survived the choice's tokenization unchanged) the extra leading token is dropped from
    both, as SGLang does. Shared by every backend that scores choices by logprobs."""
    kept, normalized = [], []
    for lps in input_token_logprobs:
        mean = compute_normalized_prompt_logprobs(lps)
        healed_token_str = lps[0][-1]
        if len(lps) > 1 and healed_token_str and prefix.endswith(healed_token_str):
            mean = (mean * len(lps) - (lps[0][0] or 0.0)) / (len(lps) - 1)
            lps = lps[1:]
        kept.append(lps)
        normalized.append(mean)
    return kept, normalized


@dataclass
class ChoicesDecision:
    decision: str
    meta_info: dict[str, Any] | None = None


class ChoicesSamplingMethod(ABC):
    @property
    def requires_unconditional_logprobs(self) -> bool:
        return False

    @abstractmethod
    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[Any]],
        output_token_logprobs: list[list[Any]],
        unconditional_token_logprobs: list[list[Any]] | None = None,
    ) -> ChoicesDecision: ...

    def __repr__(self) -> str:
        return type(self).__name__


def _base_meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs):
    return {
        "normalized_prompt_logprobs": normalized_prompt_logprobs,
        "input_token_logprobs": input_token_logprobs,
        "output_token_logprobs": output_token_logprobs,
    }


def _values(token_logprobs) -> list[float]:
    """The logprob values of one choice's token list (None counts as 0)."""
    out = []
    for tok in token_logprobs:
        v = tok[0] if isinstance(tok, (list, tuple)) else tok
        out.append(0.0 if v is None else float(v))
    return out


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The choice with the highest mean token logprob (SGLang's default)."""

    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[Any]],
        output_token_logprobs: list[list[Any]],
        unconditional_token_logprobs: list[list[Any]] | None = None,
    ) -> ChoicesDecision:
        best = int(np.argmax(normalized_prompt_logprobs))
        return ChoicesDecision(
            decision=choices[best],
            meta_info=_base_meta(
                normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs
            ),
        )


token_length_normalized = TokenLengthNormalized()


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Walk the choices token by token, keeping those with the best logprob at
    each position until one is left. A choice shorter than the longest is padded
    with its own mean logprob."""

    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[Any]],
        output_token_logprobs: list[list[Any]],
        unconditional_token_logprobs: list[list[Any]] | None = None,
    ) -> ChoicesDecision:
        num_options = len(choices)
        max_tokens = max(len(opt) for opt in input_token_logprobs)
        matrix = self._build_logprob_matrix(input_token_logprobs, max_tokens, num_options)
        remaining = self._greedy_selection(matrix, num_options, max_tokens)
        meta = _base_meta(
            normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs
        )
        meta["greedy_logprob_matrix"] = matrix.tolist()
        return ChoicesDecision(decision=choices[int(remaining[0])], meta_info=meta)

    def _build_logprob_matrix(self, input_token_logprobs, max_tokens, num_options):
        matrix = np.zeros((num_options, max_tokens))
        for i, opt in enumerate(input_token_logprobs):
            vals = _values(opt)
            if not vals:
                continue
            matrix[i, : len(vals)] = vals
            if len(vals) < max_tokens:
                matrix[i, len(vals) :] = float(np.mean(vals))
        return matrix

    def _greedy_selection(self, logprob_matrix, num_options, max_tokens):
        remaining = np.arange(num_options)
        for j in range(max_tokens):
            column = logprob_matrix[remaining, j]
            remaining = remaining[column == column.max()]
            if len(remaining) == 1:
                break
        return remaining


greedy_token_selection = GreedyTokenSelection()


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The choice with the highest mean of (conditional - unconditional) token
    logprobs. The first unconditional logprob (None: no context) counts as 0."""

    @property
    def requires_unconditional_logprobs(self) -> bool:
        return True

    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[Any]],
        output_token_logprobs: list[list[Any]],
        unconditional_token_logprobs: list[list[Any]] | None = None,
    ) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("Unconditional token logprobs are required for this method.")
        scores = self._normalize_logprobs(input_token_logprobs, unconditional_token_logprobs)
        meta = _base_meta(
            normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs
        )
        meta["unconditional_token_logprobs"] = unconditional_token_logprobs
        meta["normalized_unconditional_prompt_logprobs"] = scores
        return ChoicesDecision(decision=choices[int(np.argmax(scores))], meta_info=meta)

    def _normalize_logprobs(self, input_token_logprobs, unconditional_token_logprobs):
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            c = np.array(_values(cond), dtype=float)
            u = np.array(_values(uncond), dtype=float)  # None (first token) -> 0
            scores.append(float(np.mean(c - u)))
        return scores


unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()

__all__ = [
    "ChoicesDecision",
    "ChoicesSamplingMethod",
    "GreedyTokenSelection",
    "TokenLengthNormalized",
    "UnconditionalLikelihoodNormalized",
    "greedy_token_selection",
    "token_length_normalized",
    "unconditional_likelihood_normalized",
]
