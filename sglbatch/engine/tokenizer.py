"""Tokenizer (Hugging Face, from the model directory) and per-request incremental detokenizer."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Prompt tokens decoded along with the output so the first output token gets its leading
# space right (SentencePiece drops it when a token is decoded at the start of a string).
_CONTEXT_TOKENS = 5


class Tokenizer:
    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        try:
            self.hf = AutoTokenizer.from_pretrained(str(model_dir))
        except Exception as e:  # transformers raises many types; name the directory
            raise ValueError(f"{model_dir}: cannot load the tokenizer: {e}") from e
        self.eos_token_id = self.hf.eos_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens,
                              spaces_between_special_tokens=spaces_between_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], chat_template: str | None = None,
                            add_generation_prompt: bool = True, **template_kwargs: Any
                            ) -> list[int]:
        """Token ids of the rendered conversation; `chat_template` overrides the tokenizer's,
        `template_kwargs` (e.g. tools=...) reach the template."""
        if chat_template is None and not self.has_chat_template:
            raise ValueError("messages: this model's tokenizer has no chat template; "
                             "pass a plain text prompt instead (or serve with --chat-template)")
        try:
            text = self.hf.apply_chat_template(
                messages, chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt, **template_kwargs)
        except Exception as e:  # jinja raises its own errors for messages it cannot render
            raise ValueError(f"messages: the chat template cannot render them: {e}") from None
        # The rendered template already contains any BOS token.
        return self.hf.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text, never emitting half a UTF-8 character.

    `prefix_offset:read_offset` is a window already turned into text; decoding the window plus
    new ids and subtracting the window's text yields exactly the new characters. A trailing
    U+FFFD means a multi-byte character is incomplete, so the new ids wait for the next token.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens,
                                     self.spaces_between_special_tokens)

    def append(self, token_ids: list[int]) -> str:
        """Add output ids; return the text they completed (possibly empty)."""
        self.ids.extend(token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """At finish: whatever is left, even an incomplete character, so nothing is lost."""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += delta
        return delta


def find_stop_string(text: str, stops: list[str], new_chars: int) -> tuple[int, str] | None:
    """Earliest stop string that ends within the last `new_chars` characters of `text`."""
    best: tuple[int, str] | None = None
    for stop in stops:
        start = max(0, len(text) - new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best
