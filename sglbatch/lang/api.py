"""Public functions of the frontend language (SGLang-compatible signatures)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sglbatch.lang.choices import ChoicesSamplingMethod, token_length_normalized
from sglbatch.lang.function import SglFunction
from sglbatch.lang.global_config import global_config
from sglbatch.lang.ir import (
    SglExpr,
    SglExprList,
    SglGen,
    SglImage,
    SglRoleBegin,
    SglRoleEnd,
    SglSelect,
    SglSeparateReasoning,
    SglVideo,
)


def function(func: Callable | None = None, num_api_spec_tokens: int | None = None):
    """Decorator: ``@sgl.function`` or ``@sgl.function(num_api_spec_tokens=...)``."""
    if func:
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)

    def decorator(func):
        return SglFunction(func, num_api_spec_tokens=num_api_spec_tokens)

    return decorator


def set_default_backend(backend: Any):
    """Set the backend used by programs run without ``backend=``. Takes any
    backend, a ``Runtime``, or a bare ``sglbatch.Engine`` (wrapped)."""
    from sglbatch.lang.interpreter import _is_sglbatch_engine

    if _is_sglbatch_engine(backend):
        from sglbatch.lang.backend.engine import EngineBackend

        backend = EngineBackend.for_engine(backend)
    global_config.default_backend = backend


def _backend_or_default(backend):
    backend = backend or global_config.default_backend
    if backend is None:
        return None
    from sglbatch.lang.interpreter import resolve_backend

    return resolve_backend(backend)


def flush_cache(backend: Any = None):
    backend = _backend_or_default(backend)
    if backend is None:
        return False
    return backend.flush_cache()


def get_server_info(backend: Any = None):
    backend = _backend_or_default(backend)
    if backend is None:
        return None
    return backend.get_server_info()


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    min_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
    dtype: type | str | None = None,
    choices: list[str] | None = None,
    choices_method: ChoicesSamplingMethod | None = None,
    regex: str | None = None,
    json_schema: str | None = None,
):
    """Generate into variable ``name``; with ``choices``, a ``select``."""
    if choices:
        return SglSelect(
            name,
            choices,
            0.0 if temperature is None else temperature,
            token_length_normalized if choices_method is None else choices_method,
        )
    if regex is not None:
        re.compile(regex)  # a bad pattern fails here, in the program
    if json_schema is not None and not isinstance(json_schema, str):
        import json

        json_schema = json.dumps(json_schema)
    return SglGen(
        name,
        max_tokens,
        min_tokens,
        n,
        stop,
        stop_token_ids,
        stop_regex,
        temperature,
        top_p,
        top_k,
        min_p,
        frequency_penalty,
        presence_penalty,
        ignore_eos,
        return_logprob,
        logprob_start_len,
        top_logprobs_num,
        return_text_in_logprobs,
        dtype,
        regex,
        json_schema,
    )


def _typed_gen(dtype, name, max_tokens, n, stop, stop_token_ids, stop_regex, temperature,
               top_p, top_k, min_p, frequency_penalty, presence_penalty, ignore_eos,
               return_logprob, logprob_start_len, top_logprobs_num, return_text_in_logprobs):
    return SglGen(
        name, max_tokens, None, n, stop, stop_token_ids, stop_regex, temperature, top_p,
        top_k, min_p, frequency_penalty, presence_penalty, ignore_eos, return_logprob,
        logprob_start_len, top_logprobs_num, return_text_in_logprobs, dtype, None,
    )


def gen_int(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
):
    return _typed_gen(int, name, max_tokens, n, stop, stop_token_ids, stop_regex, temperature,
                      top_p, top_k, min_p, frequency_penalty, presence_penalty, ignore_eos,
                      return_logprob, logprob_start_len, top_logprobs_num,
                      return_text_in_logprobs)


def gen_string(
    name: str | None = None,
    max_tokens: int | None = None,
    n: int | None = None,
    stop: str | list[str] | None = None,
    stop_token_ids: list[int] | None = None,
    stop_regex: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    return_logprob: bool | None = None,
    logprob_start_len: int | None = None,
    top_logprobs_num: int | None = None,
    return_text_in_logprobs: bool | None = None,
):
    return _typed_gen(str, name, max_tokens, n, stop, stop_token_ids, stop_regex, temperature,
                      top_p, top_k, min_p, frequency_penalty, presence_penalty, ignore_eos,
                      return_logprob, logprob_start_len, top_logprobs_num,
                      return_text_in_logprobs)


def image(expr: Any):
    """An image (path, URL, bytes, base64 or data URL). The backend must serve a
    vision-language model; a text-only one (the sglbatch engine) refuses it."""
    return SglImage(expr)


def video(path: str, num_frames: int):
    return SglVideo(path, num_frames)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    temperature: float = 0.0,
    choices_method: ChoicesSamplingMethod = token_length_normalized,
):
    if choices is None:
        raise AssertionError("select: choices are required")
    return SglSelect(name, choices, temperature, choices_method)


def _role_common(name: str, expr: SglExpr | None = None):
    if expr is None:
        return SglExprList([SglRoleBegin(name), SglRoleEnd(name)])
    return SglExprList([SglRoleBegin(name), expr, SglRoleEnd(name)])


def system(expr: SglExpr | None = None):
    return _role_common("system", expr)


def user(expr: SglExpr | None = None):
    return _role_common("user", expr)


def assistant(expr: SglExpr | None = None):
    return _role_common("assistant", expr)


def system_begin():
    return SglRoleBegin("system")


def system_end():
    return SglRoleEnd("system")


def user_begin():
    return SglRoleBegin("user")


def user_end():
    return SglRoleEnd("user")


def assistant_begin():
    return SglRoleBegin("assistant")


def assistant_end():
    return SglRoleEnd("assistant")


def separate_reasoning(expr: SglExpr | None = None, model_type: str | None = None):
    """Generate with ``expr`` then split the variable into the answer (``name``)
    and the think-tag content (``name + "_reasoning_content"``)."""
    return SglExprList([expr, SglSeparateReasoning(model_type, expr=expr)])
