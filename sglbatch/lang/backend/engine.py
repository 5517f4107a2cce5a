"""`EngineBackend`: the frontend language over an in-process ``sglbatch.Engine``.

No HTTP: each ``gen``/``select`` is a typed ``engine.run`` call from the
program's pool worker; the engine thread batches whatever all running
programs have in flight, and its radix cache reuses their shared prefixes.
The requests are the ones SGLang's ``RuntimeEndpoint`` sends to its server
(same sampling parameters, the same prefill-only logprob requests for
``select``), so programs behave the same against either backend.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from sglbatch.engine.api_types import GenerateOutput, GenerateRequest
from sglbatch.engine.sampling_params import SamplingParams
from sglbatch.lang.backend.base_backend import BaseBackend
from sglbatch.lang.chat_template import get_chat_template, get_chat_template_for_tokenizer
from sglbatch.lang.choices import (
    ChoicesDecision,
    ChoicesSamplingMethod,
    compute_normalized_prompt_logprobs,
    score_choices,
    token_length_normalized,
)
from sglbatch.lang.ir import SglSamplingParams, handle_dtype_to_regex

_attach_lock = threading.Lock()


class EngineBackend(BaseBackend):
    """``EngineBackend(engine, chat_template_name=None)``."""

    # sglbatch's engine serves text-only models.
    supports_images = False

    def __init__(self, engine: Any, chat_template_name: str | None = None):
        super().__init__()
        self.engine = engine
        self.support_concate_and_append = False
        if chat_template_name:
            self.chat_template = get_chat_template(chat_template_name)
        else:
            self.chat_template = get_chat_template_for_tokenizer(
                self.get_model_name(), getattr(engine.tokenizer, "hf", None)
            )

    @classmethod
    def for_engine(cls, engine: Any) -> EngineBackend:
        """The engine's backend, created on first use and reused after."""
        with _attach_lock:
            backend = getattr(engine, "_sglbatch_lang_backend", None)
            if backend is None:
                backend = cls(engine)
                engine._sglbatch_lang_backend = backend
            return backend

    # ---- information ---------------------------------------------------------------

    def get_model_name(self) -> str:
        return str(self.engine.config.model_path)

    def get_chat_template(self):
        return self.chat_template

    def flush_cache(self):
        return self.engine.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        import dataclasses

        try:
            info = dataclasses.asdict(self.engine.config)
        except TypeError:
            info = dict(vars(self.engine.config))
        info = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}
        with contextlib.suppress(Exception):  # the load snapshot is best-effort
            info.update(self.engine.load())
        return info

    def shutdown(self):
        self.engine.shutdown()

    # ---- requests ------------------------------------------------------------------

    def _prefill(self, text: str) -> GenerateOutput:
        """A prefill-only request: caches ``text`` in the radix cache."""
        [out] = self.engine.run([GenerateRequest(prompt=text,
                                                 sampling_params=SamplingParams(max_new_tokens=0))])
        return out

    def cache_prefix(self, prefix_str: str):
        if prefix_str:
            self._prefill(prefix_str)

    def commit_lazy_operations(self, s):
        if s.text_:
            self._prefill(s.text_)

    def fill_image(self, s):
        raise ValueError(f"the engine's model ({self.get_model_name()}) is text-only")

    def _request(self, s, sampling_params: SglSamplingParams) -> GenerateRequest:
        if s.images_:
            self.fill_image(s)
        handle_dtype_to_regex(sampling_params)
        if not s.text_:
            raise ValueError("gen: the program's text is empty; the model needs a prompt")
        return GenerateRequest(prompt=s.text_, sampling_params=sampling_params.to_sampling_params(),
                               **sampling_params.logprob_args())

    def generate(self, s, sampling_params: SglSamplingParams):
        request = self._request(s, sampling_params)
        outs = self.engine.run([request])
        if request.sampling_params.n > 1:
            return [o.text for o in outs], [o.meta_info.to_json() for o in outs]
        return outs[0].text, outs[0].meta_info.to_json()

    def generate_stream(self, s, sampling_params: SglSamplingParams):
        request = self._request(s, sampling_params)
        if request.sampling_params.n != 1:
            raise ValueError("gen: streaming takes n=1")
        for delta in self.engine.stream([request]):
            yield delta.text, delta.meta_info.to_json()

    def select(
        self,
        s,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod | None = None,
    ) -> ChoicesDecision:
        if temperature > 1e-5:
            raise ValueError("select: only temperature 0 is supported (as SGLang)")
        if s.images_:
            self.fill_image(s)
        choices_method = choices_method or token_length_normalized
        if not s.text_:
            raise ValueError("select: the program's text is empty; the model needs a prompt")

        # Cache the common prefix; its length places the logprob window.
        prompt_len = self._prefill(s.text_).meta_info.prompt_tokens
        logprob_start_len = max(prompt_len - 2, 0)  # room for token healing

        scoring = SamplingParams(max_new_tokens=0, temperature=0)
        outs = self.engine.run([
            GenerateRequest(prompt=s.text_ + c, sampling_params=scoring, return_logprob=True,
                            return_text_in_logprobs=True, logprob_start_len=logprob_start_len)
            for c in choices])
        input_token_logprobs = [o.meta_info.logprobs["input_token_logprobs"] for o in outs]
        output_token_logprobs = [o.meta_info.logprobs["output_token_logprobs"] for o in outs]
        input_token_logprobs, normalized_prompt_logprobs = score_choices(
            s.text_, input_token_logprobs)

        unconditional_token_logprobs = None
        if choices_method.requires_unconditional_logprobs:
            input_ids = [[entry[1] for entry in lps] for lps in input_token_logprobs]
            outs = self.engine.run([
                GenerateRequest(input_ids=ids, sampling_params=SamplingParams(max_new_tokens=0),
                                return_logprob=True, logprob_start_len=0)
                for ids in input_ids])
            unconditional_token_logprobs = [o.meta_info.logprobs["input_token_logprobs"]
                                            for o in outs]

        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized_prompt_logprobs,
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=output_token_logprobs,
            unconditional_token_logprobs=unconditional_token_logprobs,
        )

    def concatenate_and_append(self, src_rids: list[str], dst_rid: str):
        raise NotImplementedError("the in-process engine cannot join KV caches; "
                                  "fork joins append text instead")


__all__ = ["EngineBackend", "compute_normalized_prompt_logprobs"]
