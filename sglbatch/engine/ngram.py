"""Drafts for NGRAM speculative decoding: the tokens that followed the last time a request's
own sequence (prompt and output so far) contained its current suffix.

Text that repeats its context (quoted code, lists, a model stuck in a loop) gets long drafts
for free: no draft model, one dictionary lookup per window size. The model checks the drafts
in one forward pass (`Scheduler`, `ModelRunner.launch`); a wrong draft costs its row of
that pass, never the output.
"""

from __future__ import annotations

from collections.abc import Sequence


class NgramIndex:
    """One growing token sequence, and where each of its n-grams (n = 1 .. max_window) last
    ended.

    Fed only the tokens added since the last call (`extend`), so a step costs
    O(new tokens x max_window), not O(sequence): no copy of the whole sequence per step.
    """

    def __init__(self, max_window: int):
        self.max_window = max_window
        self.tokens: list[int] = []
        self._last_end: dict[tuple[int, ...], int] = {}

    def extend(self, new_tokens: Sequence[int]) -> None:
        """Append tokens, recording the n-grams that end before the new last token (the
        current suffix must not match itself)."""
        tokens = self.tokens
        first_end = max(len(tokens), 1)
        tokens.extend(new_tokens)
        for e in range(first_end, len(tokens)):
            for n in range(1, min(self.max_window, e) + 1):
                self._last_end[tuple(tokens[e - n:e])] = e

    def propose(self, num_tokens: int) -> list[int]:
        """Up to `num_tokens` tokens that followed the most recent earlier occurrence of the
        sequence's longest matching suffix (windows from max_window down to 1 token);
        [] where even its last token never occurred before."""
        tokens, end = self.tokens, len(self.tokens)
        if num_tokens <= 0:
            return []
        for n in range(min(self.max_window, end - 1), 0, -1):
            match = self._last_end.get(tuple(tokens[end - n:end]))
            if match is not None:
                # Past the sequence's end the match repeats itself: a loop of period
                # end - match goes on (a model stuck in a loop is the common case).
                draft = tokens[match:match + num_tokens]
                period = end - match
                while len(draft) < num_tokens:
                    draft.append(draft[len(draft) - period])
                return draft
        return []
