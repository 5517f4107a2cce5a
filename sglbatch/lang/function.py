"""`SglFunction`: an `@function` program, its bound arguments, and how it runs (once, or
over a batch of arguments) through the interpreter."""

from __future__ import annotations

import inspect

from sglbatch.lang.global_config import global_config
from sglbatch.lang.ir import SglSamplingParams
from sglbatch.lang.program_runner import run_program, run_program_batch


def _default_sampling_params(**kw) -> SglSamplingParams:
    for key in ("stop", "stop_token_ids", "stop_regex"):
        if kw.get(key) is None:
            kw[key] = []
    return SglSamplingParams(**kw)


class SglFunction:
    """A program: the decorated function plus bound arguments."""

    def __init__(self, func, num_api_spec_tokens=None, bind_arguments=None):
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = bind_arguments or {}
        self.pin_prefix_rid = None

        spec = inspect.getfullargspec(func)
        if not spec.args or spec.args[0] != "s":
            raise AssertionError('The first argument must be "s"')
        self.arg_names = spec.args[1:]
        self.arg_defaults = spec.defaults if spec.defaults is not None else []
        self.__name__ = getattr(func, "__name__", "sgl_function")
        self.__doc__ = getattr(func, "__doc__", None)
        self.__wrapped__ = func

    def __repr__(self) -> str:
        return f"SglFunction({self.__name__})"

    def bind(self, **kwargs) -> SglFunction:
        unknown = [k for k in kwargs if k not in self.arg_names]
        if unknown:
            raise AssertionError(f"Unknown arguments to bind: {unknown}")
        return SglFunction(
            self.func,
            num_api_spec_tokens=self.num_api_spec_tokens,
            bind_arguments={**self.bind_arguments, **kwargs},
        )

    def run(
        self,
        *args,
        max_new_tokens: int = 128,
        n: int = 1,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        stop_regex: str | list[str] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        ignore_eos: bool = False,
        return_logprob: bool | None = None,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None,
        stream: bool = False,
        backend=None,
        use_thread: bool = True,
        **kwargs,
    ):
        """Run the program once; returns its ProgramState."""
        default_sampling_para = _default_sampling_params(
            max_new_tokens=max_new_tokens,
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
        )
        backend = backend or global_config.default_backend
        return run_program(
            self,
            backend,
            args,
            kwargs,
            default_sampling_para,
            stream,
            use_thread=use_thread,
        )

    def run_batch(
        self,
        batch_kwargs,
        *,
        max_new_tokens: int = 128,
        n: int = 1,
        stop: str | list[str] | None = None,
        stop_token_ids: list[int] | None = None,
        stop_regex: str | list[str] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = -1,
        min_p: float = 0.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        ignore_eos: bool = False,
        return_logprob: bool | None = None,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None,
        backend=None,
        num_threads: str | int = "auto",
        progress_bar: bool = False,
        generator_style: bool = False,
    ):
        """Run the program once per entry of ``batch_kwargs`` (dicts of
        arguments, or tuples of positional values), all in flight at once.
        Returns the list of ProgramStates in order (or, with
        ``generator_style=True``, a generator yielding them in order)."""
        if not isinstance(batch_kwargs, (list, tuple)):
            raise AssertionError("batch_kwargs must be a list or tuple")  # noqa: TRY004 - as SGLang
        if len(batch_kwargs) == 0:
            return []
        if not isinstance(batch_kwargs[0], dict):
            n_required = len(self.arg_names) - len(self.arg_defaults)
            converted = []
            for values in batch_kwargs:
                if not isinstance(values, (list, tuple)) or not (
                    n_required <= len(values) <= len(self.arg_names)
                ):
                    raise Exception(  # noqa: TRY002 - SGLang raises this type
                        "Given arguments mismatch the SGL function signature")
                converted.append(dict(zip(self.arg_names, values)))
            batch_kwargs = converted

        default_sampling_para = _default_sampling_params(
            max_new_tokens=max_new_tokens,
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
        )
        backend = backend or global_config.default_backend
        return run_program_batch(
            self,
            backend,
            batch_kwargs,
            default_sampling_para,
            num_threads,
            progress_bar,
            generator_style=generator_style,
        )

    def trace(self, *, backend=None, **kwargs):
        raise NotImplementedError(
            "sglbatch.lang does not implement SGLang's program tracer; "
            "prefix caching happens automatically in the engine's radix cache"
        )

    def cache(self, backend=None):
        """SGLang pre-caches the program's constant prefix found by tracing.
        The sglbatch engine caches prefixes automatically, so this is a no-op."""
        return

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)
