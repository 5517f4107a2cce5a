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
    """Where each n-gram (n = 1 .. max_window) of one growing token sequence last ended.

    Indexed incrementally: each call records the n-grams that end at tokens added since the
    previous call, so a step costs O(new tokens x max_window), not O(sequence).
    """

    def __init__(self, max_window: int):
        self.max_window = max_window
        self._last_end: dict[tuple[int, ...], int] = {}
        self._next_end = 1  # the first n-gram end not yet recorded

    def propose(self, tokens: Sequence[int], num_tokens: int) -> list[int]:
        """Up to `num_tokens` tokens that followed the most recent earlier occurrence of the
        sequence's longest matching suffix (windows from max_window down to 1 token);
        [] where even its last token never occurred before. `tokens` must extend the
        sequence of the previous call."""
        end = len(tokens)
        # Record n-grams ending before `end`: the suffix itself must not match itself.
        for e in range(self._next_end, end):
            for n in range(1, min(self.max_window, e) + 1):
                self._last_end[tuple(tokens[e - n:e])] = e
        self._next_end = max(self._next_end, end)
        if num_tokens <= 0:
            return []
        for n in range(min(self.max_window, end - 1), 0, -1):
            match = self._last_end.get(tuple(tokens[end - n:end]))
            if match is not None:
                # Past the sequence's end the match repeats itself: a loop of period
                # end - match goes on (a model stuck in a loop is the common case).
                draft = list(tokens[match:match + num_tokens])
                period = end - match
                while len(draft) < num_tokens:
                    draft.append(draft[len(draft) - period])
                return draft
        return []
