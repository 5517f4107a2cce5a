"""`generate(...)` arguments -> typed requests (at the door), and typed requests ->
validated token ids and sampling parameters."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sglbatch.engine.api_types import GenerateRequest
from sglbatch.engine.chat_messages import validate_messages
from sglbatch.engine.custom_logit_processor import load_processor
from sglbatch.engine.logprobs import LogprobOptions
from sglbatch.engine.sampling_params import SamplingParams
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

    def for_prompt(self, i: int, n: int) -> dict[str, Any]:
        values = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # token_ids_logprob is itself a list: per prompt only as a list of lists.
            per_prompt = isinstance(value, list) and (
                f.name != "token_ids_logprob" or (value and isinstance(value[0], list)))
            if per_prompt and len(value) != n:
                raise ValueError(f"{f.name}: got {len(value)} values for {n} prompts")
            values[f.name] = value[i] if per_prompt else value
        return values


def _is_batch(value: Any, item_type: type) -> bool:
    return isinstance(value, list) and bool(value) and not isinstance(value[0], item_type)


@dataclass
class RequestBatch:
    """A call's requests, and whether its prompts came as a list (errors then name the
    prompt's index)."""

    requests: list[GenerateRequest]
    prompts_are_list: bool
    # Each request's place in the caller's call, when this batch is a part of it (a
    # replica's share): errors name the caller's index.
    positions: list[int] | None = None

    @property
    def returns_list(self) -> bool:
        """SGLang returns a list for a list of prompts, or when a prompt asks for n > 1."""
        return self.prompts_are_list or any(r.sampling_params.n > 1 for r in self.requests)


def _prompt_field(prompt: Any, input_ids: Any, messages: Any) -> str:
    """Which one of the three holds the prompt(s); there must be exactly one."""
    given = [name for name, v in (("prompt", prompt), ("input_ids", input_ids),
                                  ("messages", messages)) if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of prompt, input_ids or messages "
                         f"(got {given or 'none'})")
    return given[0]


def requests_from_generate_args(prompt: Any = None, input_ids: Any = None,
                                messages: Any = None, sampling_params: Any = None,
                                rid: Any = None, **extras: Any) -> RequestBatch:
    """SGLang's `generate` arguments (one prompt or lists, with per-prompt or shared
    sampling parameters, rids and extras) as typed requests."""
    source = _prompt_field(prompt, input_ids, messages)
    try:
        request_extras = RequestExtras(**extras)
    except TypeError:
        known = [f.name for f in dataclasses.fields(RequestExtras)]
        raise ValueError(f"generate: unknown argument(s) {sorted(extras)}; "
                         f"valid extras are {known}") from None
    if prompt is not None:
        is_batch, items = isinstance(prompt, list), prompt
    elif input_ids is not None:
        is_batch, items = _is_batch(input_ids, int), input_ids
    else:
        is_batch, items = _is_batch(messages, dict), messages
    items = items if is_batch else [items]
    n = len(items)
    if isinstance(sampling_params, list):
        if len(sampling_params) != n:
            raise ValueError(f"sampling_params: got {len(sampling_params)} for {n} prompts")
        params_list = sampling_params
    else:
        params_list = [sampling_params] * n
    if rid is not None and is_batch and not isinstance(rid, list):
        raise ValueError("rid: a batch needs a list of request ids")
    rids = rid if isinstance(rid, list) else [rid] * n
    requests = [GenerateRequest(**{source: item}, sampling_params=SamplingParams.from_dict(p),
                                rid=None if r is None else str(r),
                                **request_extras.for_prompt(i, n))
                for i, (item, p, r) in enumerate(zip(items, params_list, rids))]
    return RequestBatch(requests, is_batch)


def _token_ids(tokenizer: Tokenizer, request: GenerateRequest, index: int | None
               ) -> list[int]:
    """The request's prompt as token ids; `index` is its place in a list of prompts."""
    at = "" if index is None else f"[{index}]"
    if request.prompt is not None:
        if not isinstance(request.prompt, str):
            raise ValueError(f"prompt[{index or 0}]: expected a string, got "
                             f"{type(request.prompt).__name__}")
        if not request.prompt:
            raise ValueError(f"prompt{at}: the prompt is empty")
        return tokenizer.encode(request.prompt)
    if request.input_ids is not None:
        ids = request.input_ids
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError(f"input_ids[{index or 0}]: expected a list of integers")
        return list(ids)
    validate_messages(request.messages, f"messages{at}")
    return tokenizer.apply_chat_template(request.messages)


def normalize_inputs(tokenizer: Tokenizer, batch: RequestBatch, *, vocab_size: int,
                     max_req_len: int, compile_grammar: Callable[[str, str], Any],
                     allow_custom_logit_processor: bool) -> list[RequestInput]:
    """Validate everything up front so a bad request fails in the caller, not in the loop.
    A prompt with `n` > 1 becomes n consecutive requests."""
    max_prompt_len = max_req_len - 1  # room for at least one output token
    out = []
    for i, request in enumerate(batch.requests):
        index = (batch.positions[i] if batch.positions else i) \
            if batch.prompts_are_list else None
        where = _prompt_field(request.prompt, request.input_ids, request.messages) + \
            ("" if index is None else f"[{index}]")
        ids = _token_ids(tokenizer, request, index)
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
        params = SamplingParams.from_dict(request.sampling_params)  # a copy: clipped below
        params.verify()
        # As SGLang: the output may use whatever context the prompt leaves.
        params.max_new_tokens = min(params.max_new_tokens, max_req_len - len(ids))
        logprob_options = None
        if request.return_logprob:
            logprob_options = LogprobOptions.resolve(
                len(ids), request.logprob_start_len, request.top_logprobs_num,
                request.token_ids_logprob, bool(request.return_text_in_logprobs), vocab_size,
                where)
        processor = None
        if request.custom_logit_processor is not None:
            if not allow_custom_logit_processor:
                raise ValueError(
                    "custom_logit_processor: refused, it runs code sent with the request; "
                    "start the engine with enable_custom_logit_processor=True "
                    "(--enable-custom-logit-processor) to allow it")
            processor = load_processor(request.custom_logit_processor)
        compiled = compile_grammar(*params.constraint) if params.constraint else None
        for j in range(params.n):
            rid_j = (request.rid if params.n == 1 else f"{request.rid}-{j}") if request.rid \
                else uuid.uuid4().hex
            out.append(RequestInput(rid_j, ids, params, logprob_options, compiled,
                                    processor, sample_index=j))
    return out
