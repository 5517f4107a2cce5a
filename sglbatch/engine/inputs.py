"""Turns `generate(...)` arguments into validated token ids and sampling parameters."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sglbatch.engine.chat_messages import validate_messages
from sglbatch.engine.custom_logit_processor import load_processor
from sglbatch.engine.logprobs import LogprobOptions
from sglbatch.engine.request import SamplingParams
from sglbatch.engine.tokenizer import Tokenizer


@dataclass
class RequestInput:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    logprob_options: LogprobOptions | None = None
    compiled_grammar: Any = None  # shared by the n samples; each gets its own matcher
    custom_logit_processor: Any = None
    sample_index: int = 0  # which of the prompt's n parallel samples this is


@dataclass
class RequestExtras:
    """`generate` arguments beyond the prompt and sampling parameters; each may be one
    value for all prompts or a list with one per prompt, as in SGLang."""

    return_logprob: Any = False
    logprob_start_len: Any = None
    top_logprobs_num: Any = None
    token_ids_logprob: Any = None
    return_text_in_logprobs: bool = False
    custom_logit_processor: Any = None

    def for_prompt(self, i: int, n: int) -> RequestExtras:
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # token_ids_logprob is itself a list: per prompt only as a list of lists.
            per_prompt = isinstance(value, list) and (
                f.name != "token_ids_logprob" or (value and isinstance(value[0], list)))
            if per_prompt and len(value) != n:
                raise ValueError(f"{f.name}: got {len(value)} values for {n} prompts")
            values[f.name] = value[i] if per_prompt else value
        return RequestExtras(**values)


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
        validate_messages(conv, f"messages[{i}]" if batch else "messages")
    return [tokenizer.apply_chat_template(conv) for conv in conversations], batch, "messages"


def normalize_inputs(tokenizer: Tokenizer, *, prompt: Any = None, input_ids: Any = None,
                     messages: Any = None, sampling_params: Any = None, rid: Any = None,
                     extras: RequestExtras | None = None, vocab_size: int, max_req_len: int,
                     compile_grammar: Callable[[str, str], Any],
                     allow_custom_logit_processor: bool) -> tuple[list[RequestInput], bool]:
    """Validate everything up front so a bad request fails in the caller, not in the loop.
    A prompt with `n` > 1 becomes n consecutive requests (so the call returns a list)."""
    extras = extras or RequestExtras()
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
        extra = extras.for_prompt(i, n)
        logprob_options = None
        if extra.return_logprob:
            logprob_options = LogprobOptions.resolve(
                len(ids), extra.logprob_start_len, extra.top_logprobs_num,
                extra.token_ids_logprob, bool(extra.return_text_in_logprobs), vocab_size, where)
        processor = None
        if extra.custom_logit_processor is not None:
            if not allow_custom_logit_processor:
                raise ValueError(
                    "custom_logit_processor: refused, it runs code sent with the request; "
                    "start the engine with enable_custom_logit_processor=True "
                    "(--enable-custom-logit-processor) to allow it")
            processor = load_processor(extra.custom_logit_processor)
        compiled = compile_grammar(*params.constraint) if params.constraint else None
        base_rid = str(req_id) if req_id is not None else None
        for j in range(params.n):
            rid_j = (base_rid if params.n == 1 else f"{base_rid}-{j}") if base_rid \
                else uuid.uuid4().hex
            requests.append(RequestInput(rid_j, ids, params, logprob_options, compiled,
                                         processor, sample_index=j))
    is_batch = is_batch or any(r.sampling_params.n > 1 for r in requests)
    return requests, is_batch
