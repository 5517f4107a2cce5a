"""`select` on the OpenAI API (SGLang's raises for chat models and needs tiktoken's exact
tokenization). A mixin of the OpenAI backend.

* completion models: the choices are scored by their prompt logprobs (`echo=True`,
  `logprobs=0`, `max_tokens=0`), with the same token healing and `choices_method` as the
  native backend, so against an sglbatch/SGLang server it decides as RuntimeEndpoint does;
  where the server gives no prompt logprobs, as below;
* otherwise (chat models, or no logprobs): the model generates the continuation (greedy
  by default) and the choice it starts with, or names, is taken; for chat models where
  nothing matches, the model is asked once more with the options listed in the last user
  message; where that fails too, the most similar choice wins.
  `meta_info["select_method"]` says which way a decision was reached.
"""

from __future__ import annotations

import difflib
import logging
import re
from typing import Any

from sglbatch.lang.choices import ChoicesDecision, ChoicesSamplingMethod

logger = logging.getLogger(__name__)


class OpenAIChoiceSelection:
    """The OpenAI backend's `select`."""

    def __init__(self) -> None:
        super().__init__()
        # Whether the server scores prompts (echo + logprobs); learnt on first select.
        self._echo_logprobs: bool | None = None

    def select(
        self,
        s: Any,
        choices: list[str],
        temperature: float,
        choices_method: ChoicesSamplingMethod | None = None,
    ) -> ChoicesDecision:
        if choices_method is None:
            from sglbatch.lang.choices import token_length_normalized

            choices_method = token_length_normalized
        if not self.is_chat_model and temperature <= 1e-5 and self._echo_logprobs is not False:
            decision = self._select_by_logprobs(s, choices, choices_method)
            if decision is not None:
                return decision
        return self._select_by_generation(s, choices, temperature)

    def _prompt_logprobs(self, prompts: list[str]) -> list[list[list]] | None:
        """Per prompt, [logprob, None, token_text] for each of its tokens (the first has
        logprob None), from a completions request with echo; None where unsupported."""
        openai = self._openai
        if self._echo_logprobs is False:
            return None
        try:
            ret = self.client.completions.create(
                model=self.model_name, prompt=prompts, max_tokens=0, echo=True, logprobs=0,
                temperature=0)
        except (openai.BadRequestError, openai.NotFoundError,
                openai.UnprocessableEntityError) as e:
            logger.info("prompt logprobs unavailable (%s); select generates instead", e)
            self._echo_logprobs = False
            return None
        self._count_usage(ret)
        out: list[list[list] | None] = [None] * len(prompts)
        for choice in ret.choices:
            lp = choice.logprobs
            if lp is None or not lp.tokens or lp.token_logprobs is None:
                self._echo_logprobs = False
                return None
            out[choice.index] = [[p, None, t] for p, t in zip(lp.token_logprobs, lp.tokens)]
        if any(o is None for o in out):
            self._echo_logprobs = False
            return None
        self._echo_logprobs = True
        return out  # type: ignore[return-value]

    def _select_by_logprobs(self, s: Any, choices: list[str],
                            choices_method: ChoicesSamplingMethod
                            ) -> ChoicesDecision | None:
        """RuntimeEndpoint.select's scoring, with the echoed prompt logprobs of
        /v1/completions in place of /generate's input logprobs."""
        prompts = ([s.text_] if s.text_ else []) + [s.text_ + c for c in choices]
        scored = self._prompt_logprobs(prompts)
        if scored is None:
            return None
        prompt_len = len(scored[0]) if s.text_ else 0
        scored = scored[1:] if s.text_ else scored
        start = max(prompt_len - 2, 0)  # for token healing

        input_token_logprobs = [entries[start:] for entries in scored]
        normalized = [_normalized_logprob(x) for x in input_token_logprobs]
        for i, entries in enumerate(input_token_logprobs):
            if len(entries) > 1 and entries[0][2] and s.text_.endswith(entries[0][2]):
                # No token healing happened: drop the prefix's token.
                first = entries[0][0] or 0.0
                n = len(entries)
                normalized[i] = (normalized[i] * n - first) / (n - 1)
                input_token_logprobs[i] = entries[1:]

        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            # The choices' tokens on their own (re-tokenized from their texts: the legacy
            # logprobs format has no token ids), every token's logprob, the first None.
            texts = ["".join(e[2] for e in entries) for entries in input_token_logprobs]
            unconditional = self._prompt_logprobs(texts)
            if unconditional is None or any(
                    len(u) != len(c) for u, c in zip(unconditional, input_token_logprobs)):
                raise RuntimeError(
                    "select with unconditional_likelihood_normalized needs the choices' "
                    "token logprobs without the prompt, which this server did not give "
                    "token for token")
        decision = choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=[[] for _ in choices],
            unconditional_token_logprobs=unconditional,
        )
        decision.meta_info = {**(decision.meta_info or {}), "select_method": "logprobs"}
        return decision

    def _select_by_generation(self, s: Any, choices: list[str],
                              temperature: float) -> ChoicesDecision:
        max_tokens = min(max(len(c) for c in choices) + 8, 1024)
        kwargs: dict[str, Any] = {"temperature": temperature}
        if self._is_reasoning_model():
            kwargs["max_completion_tokens"] = max_tokens
        else:
            kwargs["max_tokens"] = max_tokens
        generated: list[str] = []
        if self.is_chat_model:
            self._require_chat_prefix(s, "sgl.gen(choices=...)/sgl.select")
            text, _ = self._completion(s.messages_, **kwargs)
            generated.append(text)
            decision, how = _match_choice(text, choices)
            if decision is None:  # ask again, with the options spelt out
                kwargs[("max_completion_tokens" if "max_completion_tokens" in kwargs
                        else "max_tokens")] = max_tokens + 16
                text, _ = self._completion(_with_options(s.messages_, choices), **kwargs)
                generated.append(text)
                decision, how = _match_choice(text, choices)
                how = how and how + "_after_prompting"
        else:
            text, _ = self._completion(s.text_, **kwargs)
            generated.append(text)
            decision, how = _match_choice(text, choices)
        if decision is None:
            decision, how = _closest_choice(generated[-1], choices), "closest"
        return ChoicesDecision(decision=decision, meta_info={
            "select_method": f"generation:{how}", "generated_texts": generated})


def _normalized_logprob(entries: list[list]) -> float:
    values = [x[0] for x in entries if x[0]]
    return sum(values) / len(values) if values else 0.0


def _match_choice(text: str, choices: list[str]) -> tuple[str | None, str | None]:
    """The choice the generated text starts with (the longest such), else the one it names
    first; case-sensitive before case-insensitive."""
    stripped = text.lstrip()

    def starts(fold: bool) -> list[str]:
        f = (lambda x: x.lower()) if fold else (lambda x: x)
        return [c for c in choices if c.strip() and (
            f(text).startswith(f(c)) or f(stripped).startswith(f(c.strip())))]

    for fold, how in ((False, "prefix"), (True, "prefix_nocase")):
        hits = starts(fold)
        if hits:
            return max(hits, key=lambda c: len(c.strip())), how
    found = []
    for i, c in enumerate(choices):
        word = c.strip()
        if not word:
            continue
        # A whole-word mention ("no" is not in "not"), case-insensitive.
        pattern = (r"(?<!\w)" if word[0].isalnum() else "") + re.escape(word) + (
            r"(?!\w)" if word[-1].isalnum() else "")
        m = re.search(pattern, stripped, flags=re.IGNORECASE)
        if m:
            found.append((m.start(), -len(word), i))
    if found:
        return choices[min(found)[2]], "mention"
    return None, None


def _closest_choice(text: str, choices: list[str]) -> str:
    stripped = text.strip().lower()

    def score(c: str) -> float:
        target = c.strip().lower()
        return difflib.SequenceMatcher(None, stripped[:max(len(target) * 2, 1)],
                                       target).ratio()

    return max(choices, key=score)


def _with_options(messages: list[dict[str, Any]], choices: list[str]) -> list[dict[str, Any]]:
    """The messages with the options listed in the last user message."""
    note = ("\n\nAnswer with exactly one of the following options, and nothing else:\n"
            + "\n".join(f"- {c.strip()}" for c in choices))
    messages = [dict(m) for m in messages]
    for m in reversed(messages):
        if m.get("role") == "user" and isinstance(m.get("content"), str):
            m["content"] += note
            return messages
    return messages + [{"role": "user", "content": note.strip()}]
