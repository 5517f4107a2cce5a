"""The one mapping between OpenAI's sampling field names and SGLang's (this engine's).

The server reads OpenAI requests with it; the jobs' endpoint client, the frontend
language's OpenAI backend and `bench serving` write OpenAI requests with it.
"""

from __future__ import annotations

from typing import Any

# SGLang name -> OpenAI name, where the two differ.
TO_OPENAI = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
             "sampling_seed": "seed"}
FROM_OPENAI = {openai: sglang for sglang, openai in TO_OPENAI.items()}
# Spelled alike: OpenAI's own fields, plus the extra-body fields SGLang's OpenAI server takes.
SAME_NAME = ("n", "stop", "temperature", "top_p", "frequency_penalty", "presence_penalty",
             "logit_bias", "top_k", "min_p", "repetition_penalty", "regex", "ebnf",
             "json_schema", "stop_token_ids", "ignore_eos", "skip_special_tokens",
             "spaces_between_special_tokens", "no_stop_trim", "custom_params")


def to_openai(params: dict[str, Any]) -> dict[str, Any]:
    """SGLang sampling parameters as OpenAI request fields (unmapped names kept as they are:
    an OpenAI-compatible server that does not know one says so)."""
    return {TO_OPENAI.get(name, name): value for name, value in params.items()}


def from_openai(fields: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields of an OpenAI request (others dropped) under SGLang's names; None
    values are left out (the engine's defaults apply)."""
    return {FROM_OPENAI.get(name, name): value for name, value in fields.items()
            if value is not None and (name in FROM_OPENAI or name in SAME_NAME)}
