"""The intermediate representation of the frontend language (SGLang-compatible).

A program is an ``@function``-decorated Python function whose first argument
``s`` is a program state; ``s += expr`` appends an expression (text, ``gen``,
``select``, a role, an image). The expression classes here are plain data; the
interpreter (``sglbatch.lang.interpreter``) executes them against a backend.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from sglbatch.engine.sampling_params import SamplingParams
from sglbatch.lang.choices import ChoicesSamplingMethod
from sglbatch.openai_names import to_openai

# The regexes that gen(dtype=...) maps to (the same strings as SGLang's).
REGEX_INT = r"[-+]?[0-9]+[ \n]*"
REGEX_FLOAT = r"[-+]?[0-9]*\.?[0-9]+[ \n]*"
REGEX_BOOL = r"(True|False)"
REGEX_STR = r"\"[\w\d\s]*\""
_LOGPROB_ARGS = ("return_logprob", "logprob_start_len", "top_logprobs_num",
                 "return_text_in_logprobs")


@dataclasses.dataclass
class SglSamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    n: int = 1
    stop: str | list[str] = ()
    stop_token_ids: list[int] | None = ()
    stop_regex: str | list[str] | None = ()
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: disabled
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    json_schema: str | None = None
    # Set by the interpreter from global_config (SGLang's knobs), so no backend reads it.
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    # Constrained generation; not part of the to_*_kwargs of API backends.
    dtype: Any | None = None
    regex: str | None = None

    def clone(self) -> SglSamplingParams:
        return dataclasses.replace(self)

    def _warn_regex(self, backend: str) -> None:
        if self.regex is not None:
            warnings.warn(f"Regular expression is not supported in the {backend} backend.")

    def _stop_list(self) -> list[str]:
        if not self.stop:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_openai_kwargs(self) -> dict[str, Any]:
        # OpenAI has no top_k.
        self._warn_regex("OpenAI")
        kwargs = to_openai({
            "max_new_tokens": self.max_new_tokens,
            "n": self.n,
            "stop": self.stop or None,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
        })
        kwargs["max_completion_tokens"] = kwargs["max_tokens"]  # what newer models read
        return kwargs

    def to_vertexai_kwargs(self) -> dict[str, Any]:
        self._warn_regex("VertexAI")
        return {
            "candidate_count": 1,
            "max_output_tokens": self.max_new_tokens,
            "stop_sequences": self.stop,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k if self.top_k > 0 else None,
        }

    def to_anthropic_kwargs(self) -> dict[str, Any]:
        # Anthropic has no frequency/presence penalties.
        self._warn_regex("Anthropic")
        return {
            "max_tokens": self.max_new_tokens,
            "stop_sequences": (
                self.stop if isinstance(self.stop, (list, tuple)) else [self.stop]
            ),
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
        }

    def to_litellm_kwargs(self) -> dict[str, Any]:
        self._warn_regex("LiteLLM")  # LiteLLM speaks OpenAI's names
        return to_openai({
            "max_new_tokens": self.max_new_tokens,
            "stop": self.stop or None,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
        })

    def to_sampling_params(self) -> SamplingParams:
        """The engine's (and a server's) sampling parameters for this gen call."""
        return SamplingParams.from_dict(self.to_srt_kwargs())

    def logprob_args(self) -> dict[str, Any]:
        """The logprob arguments this gen call set (SGLang's generate arguments)."""
        return {name: getattr(self, name) for name in _LOGPROB_ARGS
                if getattr(self, name) is not None}

    def to_srt_kwargs(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "min_new_tokens": self.min_new_tokens,
            "n": self.n,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "stop_regex": self.stop_regex,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "ignore_eos": self.ignore_eos,
            "regex": self.regex,
            "json_schema": self.json_schema,
            "skip_special_tokens": self.skip_special_tokens,
            "spaces_between_special_tokens": self.spaces_between_special_tokens,
        }


def handle_dtype_to_regex(sampling_params: SglSamplingParams) -> None:
    """gen(dtype=...) -> the regex SGLang's RuntimeEndpoint sends (int and float
    also stop at a space or newline). In place."""
    dtype = sampling_params.dtype
    if dtype is None:
        return
    stop = sampling_params.stop
    stop = [] if not stop else ([stop] if isinstance(stop, str) else list(stop))
    if dtype in ("int", int):
        regex = REGEX_INT
        stop.extend([" ", "\n"])
    elif dtype in ("float", float):
        regex = REGEX_FLOAT
        stop.extend([" ", "\n"])
    elif dtype in ("str", str):
        regex = REGEX_STR
    elif dtype in ("bool", bool):
        regex = REGEX_BOOL
    else:
        raise RuntimeError(f"Invalid dtype: {dtype}")
    if sampling_params.regex is not None:
        warnings.warn(
            f"Both dtype and regex are set. Only dtype will be used. dtype: {dtype}, "
            f"regex: {sampling_params.regex}"
        )
    sampling_params.stop = stop
    sampling_params.regex = regex


class SglExpr:
    node_ct = 0

    def __init__(self):
        self.node_id = SglExpr.node_ct
        self.prev_node = None
        self.pid = None
        SglExpr.node_ct += 1

    @staticmethod
    def _as_expr(other) -> SglExpr:
        if isinstance(other, str):
            return SglConstantText(other)
        if not isinstance(other, SglExpr):
            raise AssertionError(  # noqa: TRY004 - as SGLang (an assert there)
                f"cannot concatenate {type(other).__name__} with an SglExpr")
        return other

    def __add__(self, other):
        return self.concatenate_ir(self, self._as_expr(other))

    def __radd__(self, other):
        return self.concatenate_ir(self._as_expr(other), self)

    def concatenate_ir(self, a, b):
        left = a.expr_list if isinstance(a, SglExprList) else [a]
        right = b.expr_list if isinstance(b, SglExprList) else [b]
        return SglExprList(left + right)


class SglExprList(SglExpr):
    def __init__(self, expr_list: list[SglExpr]):
        super().__init__()
        self.expr_list = expr_list

    def __repr__(self):
        return f"ExprList({self.expr_list})"


class SglArgument(SglExpr):
    def __init__(self, name: str, value: str):
        super().__init__()
        self.name = name
        self.value = value

    def __repr__(self):
        return f"Argument(name={self.name}, value={self.value!r})"

    def __len__(self):
        return len(self.value)

    def __getitem__(self, i):
        return self.value[i]

    def __int__(self):
        return self.value

    def __bool__(self):
        return self.value

    def __format__(self, *args):
        raise TypeError("Cannot put argument inside a f-string.")


class SglImage(SglExpr):
    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def __repr__(self) -> str:
        return f"SglImage({self.path})"


class SglVideo(SglExpr):
    def __init__(self, path: str, num_frames: int):
        super().__init__()
        self.path = path
        self.num_frames = num_frames

    def __repr__(self) -> str:
        return f"SglVideo({self.path}, {self.num_frames})"


class SglGen(SglExpr):
    def __init__(
        self,
        name: str | None = None,
        max_new_tokens: int | None = None,
        min_new_tokens: int | None = None,
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
        dtype: type | None = None,
        regex: str | None = None,
        json_schema: str | None = None,
    ):
        super().__init__()
        self.name = name
        # None fields mean "inherit the program's default".
        self.sampling_params = SglSamplingParams(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            n=n,
            stop=stop,
            stop_token_ids=stop_token_ids,
            stop_regex=stop_regex,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            ignore_eos=ignore_eos,
            return_logprob=return_logprob,
            logprob_start_len=logprob_start_len,
            top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
            dtype=dtype,
            regex=regex,
            json_schema=json_schema,
        )

    def __repr__(self):
        return f"Gen('{self.name}')"


class SglConstantText(SglExpr):
    def __init__(self, value: str):
        super().__init__()
        self.value = value

    def __repr__(self):
        return f"Constant({self.value!r})"


class SglRoleBegin(SglExpr):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def __repr__(self):
        return f"RoleBegin({self.role})"


class SglRoleEnd(SglExpr):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def __repr__(self):
        return f"RoleEnd({self.role})"


class SglSelect(SglExpr):
    def __init__(
        self,
        name: str,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod,
    ):
        super().__init__()
        self.name = name
        self.choices = choices
        self.temperature = temperature
        self.choices_method = choices_method

    def __repr__(self):
        return f"Select({self.name}, choices={self.choices}, choices_method={self.choices_method})"


class SglFork(SglExpr):
    def __init__(self, number: int, position_ids_offset=None):
        super().__init__()
        self.number = number
        self.position_ids_offset = position_ids_offset

    def __repr__(self):
        return f"Fork(number={self.number})"


class SglGetForkItem(SglExpr):
    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def __repr__(self):
        return f"GetForkItem(index={self.index})"


class SglVariable(SglExpr):
    def __init__(self, name: str, source):
        super().__init__()
        self.name = name
        self.source = source

    def __repr__(self):
        return f"Variable('{self.name}')"


class SglVarScopeBegin(SglExpr):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __repr__(self):
        return f"VarScopeBegin('{self.name}')"


class SglVarScopeEnd(SglExpr):
    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def __repr__(self):
        return f"VarScopeEnd('{self.name}')"


class SglConcateAndAppend(SglExpr):
    def __init__(self, states):
        super().__init__()
        self.states = states

    def __repr__(self):
        return f"ConcatenateAndAppend('{self.states}')"


class SglCommitLazy(SglExpr):
    def __repr__(self):
        return "CommitLazy()"


class SglSeparateReasoning(SglExpr):
    """Split a generated variable ``name`` into ``name`` (the answer) and
    ``name_reasoning_content`` (the text inside the model's think tags)."""

    def __init__(self, model_type: str | None, expr: SglExpr):
        super().__init__()
        self.model_type = model_type
        self.expr = expr
        self.name = None
        self._process_expr(expr)

    def process_name_for_reasoning(self, name):
        if not name:
            raise ValueError("name must be provided")
        return f"{name}_reasoning_content"

    def _process_expr(self, expr):
        if isinstance(expr, (SglGen, SglSelect)):
            self.name = self.process_name_for_reasoning(expr.name)
        elif isinstance(expr, SglExprList):
            for x in expr.expr_list:
                self._process_expr(x)

    def __repr__(self):
        return f"SeparateReasoning(model_type={self.model_type}, name={self.name})"
