"""Structured outputs: JSON schema, regex and EBNF constraints, compiled by xgrammar.

A constraint is compiled once (cached by its text) in the caller's thread, so a bad one is
an error at submission; each request then walks its own matcher. At sampling time the
constrained rows of the batch get their allowed-token bitmask applied to the logits, so
constrained and free requests share one batch.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from typing import Any

import torch

_KIND_NAMES = {"json_schema": "JSON schema", "regex": "regex", "ebnf": "EBNF grammar"}
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


class GrammarCompiler:
    """Compiles constraints for one tokenizer; keeps the most recent `max_cached`."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, max_cached: int = 256):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self.max_cached = max_cached
        self.compilations = 0  # cache misses, for tests and logs

    def compile(self, kind: str, source: str) -> Any:
        """The compiled grammar for `sampling_params.<kind> = source`; ValueError if invalid."""
        key = (kind, source)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            try:
                compiled = self._compile(kind, source)
            except RuntimeError as e:
                message = _XGRAMMAR_PREFIX.sub("", str(e).strip())
                raise ValueError(
                    f"sampling_params.{kind}: invalid {_KIND_NAMES[kind]}: {message}") from None
            self.compilations += 1
            self._cache[key] = compiled
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
            return compiled

    def _compile(self, kind: str, source: str) -> Any:
        if kind == "json_schema":
            return self._compiler.compile_json_schema(source)
        if kind == "regex":
            return self._compiler.compile_regex(source)
        return self._compiler.compile_grammar(source)


class Grammar:
    """One request's position in its constraint."""

    def __init__(self, compiled: Any):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)

    def accept(self, token_id: int) -> bool:
        return self.matcher.accept_token(token_id)


@functools.cache
def _batch_filler() -> Any:
    """xgrammar's multi-threaded mask filler: 64 JSON rows take 5 ms a step on 2 threads
    against 9.5 ms one by one. Its threads sleep between steps, so torch keeps the cores."""
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher(max_threads=torch.get_num_threads())


def apply_grammar_masks(logits: torch.Tensor, grammars: list[Grammar | None]) -> None:
    """Set the logits of tokens each constrained row may not take to -inf, in place."""
    import xgrammar as xgr

    rows = [i for i, g in enumerate(grammars) if g is not None]
    if not rows:
        return
    # xgrammar fills the mask on the host (all bits set = every token allowed).
    bitmask = torch.full(xgr.get_bitmask_shape(len(grammars), logits.shape[-1]), -1,
                         dtype=xgr.bitmask_dtype, device="cpu")
    _batch_filler().batch_fill_next_token_bitmask(
        [grammars[i].matcher for i in rows], bitmask, indices=rows)
    # On a GPU the mask is applied there (xgrammar's own kernel).
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), indices=rows)
