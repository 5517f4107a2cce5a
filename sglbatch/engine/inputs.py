"""Turns `generate(...)` arguments into validated token ids and sampling parameters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sglbatch.engine.request import SamplingParams
from sglbatch.engine.tokenizer import Tokenizer


@dataclass
class RequestInput:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams


def _is_batch(value: Any, item_type: type) -> bool:
    return isinstance(value, list) and bool(value) and not isinstance(value[0], item_type)


def _prompts_to_ids(tokenizer: Tokenizer, prompt: Any, input_ids: Any, messages: Any
                    ) -> tuple[list[list[int]], bool, str]:
    """Token ids per request, whether the call was a batch, and which argument gave them."""
    given = [name for name, v in (("prompt", prompt), ("input_ids", input_ids),
                                  ("messages", messages)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of prompt, input_ids or messages (got {given or 'none'})")
    if prompt is not None:
        batch = isinstance(prompt, list)
        texts = prompt if batch else [prompt]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"prompt[{i}]: expected a string, got {type(text).__name__}")
            if not text:
                raise ValueError(f"prompt{f'[{i}]' if batch else ''}: the prompt is empty")
        return [tokenizer.encode(t) for t in texts], batch, "prompt"
    if input_ids is not None:
        batch = _is_batch(input_ids, int)
        id_lists = input_ids if batch else [input_ids]
        for i, ids in enumerate(id_lists):
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise ValueError(f"input_ids[{i}]: expected a list of integers")
        return [list(ids) for ids in id_lists], batch, "input_ids"
    batch = _is_batch(messages, dict)
    conversations = messages if batch else [messages]
    for i, conv in enumerate(conversations):
        if not isinstance(conv, list) or not conv or not all(isinstance(m, dict) for m in conv):
            raise ValueError(f"messages[{i}]: expected a non-empty list of "
                             "{'role': ..., 'content': ...} dicts")
    return [tokenizer.apply_chat_template(conv) for conv in conversations], batch, "messages"


def normalize_inputs(tokenizer: Tokenizer, *, prompt: Any = None, input_ids: Any = None,
                     messages: Any = None, sampling_params: Any = None, rid: Any = None,
                     vocab_size: int, max_req_len: int) -> tuple[list[RequestInput], bool]:
    """Validate everything up front so a bad request fails in the caller, not in the loop."""
    ids_list, is_batch, source = _prompts_to_ids(tokenizer, prompt, input_ids, messages)
    n = len(ids_list)
    if isinstance(sampling_params, list):
        if len(sampling_params) != n:
            raise ValueError(f"sampling_params: got {len(sampling_params)} for {n} prompts")
        params_list = sampling_params
    else:
        params_list = [sampling_params] * n
    rids = rid if isinstance(rid, list) else [rid] * n if rid is not None else [None] * n
    if rid is not None and is_batch and not isinstance(rid, list):
        raise ValueError("rid: a batch needs a list of request ids")

    max_prompt_len = max_req_len - 1  # room for at least one output token
    requests = []
    for i, (ids, raw_params, req_id) in enumerate(zip(ids_list, params_list, rids)):
        where = f"{source}[{i}]" if is_batch else source
        if not ids:
            raise ValueError(f"{where}: the prompt is empty (0 tokens)")
        if len(ids) > max_prompt_len:
            raise ValueError(
                f"{where}: {len(ids)} tokens is longer than the model's context allows "
                f"({max_prompt_len} prompt tokens at most); shorten the prompt")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{where}: token ids {bad[:5]} are outside the "
                             f"vocabulary [0, {vocab_size})")
        params = SamplingParams.from_dict(raw_params)
        params.verify()
        # As SGLang: the output may use whatever context the prompt leaves.
        params.max_new_tokens = min(params.max_new_tokens, max_req_len - len(ids))
        requests.append(RequestInput(str(req_id) if req_id is not None else uuid.uuid4().hex,
                                     ids, params))
    return requests, is_batch
