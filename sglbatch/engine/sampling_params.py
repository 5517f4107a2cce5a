"""SGLang's sampling parameters: one definition, validated in one place, built by every
caller (engine, server, jobs, the frontend language, bench). No torch here, so the light
frontend can build them too."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

GREEDY_EPS = 1e-6  # temperatures below this mean greedy, as in SGLang

# SGLang parameters this version accepts but does not act on yet; refusing them is
# better than silently ignoring a constraint the caller relies on.
_NOT_YET_SUPPORTED = {
    "structural_tag": None,
    "stop_regex": None,
}
CONSTRAINT_KINDS = ("json_schema", "regex", "ebnf")


@dataclass
class SamplingParams:
    """SGLang's sampling parameters (same names, same defaults)."""

    max_new_tokens: int = 128
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    stream_interval: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    custom_params: dict[str, Any] | None = None
    logit_bias: dict[int, float] | None = None
    stop_regex: str | list[str] | None = None

    @classmethod
    def from_dict(cls, params: dict[str, Any] | SamplingParams | None) -> SamplingParams:
        """Build from a user dict, naming any unknown key (a typo must not pass silently)."""
        if isinstance(params, SamplingParams):
            return dataclasses.replace(params)
        params = dict(params or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"sampling_params: unknown key(s) {unknown}; valid keys are {sorted(known)}"
            )
        # None means "default" for every field, as SGLang's /generate allows.
        return cls(**{k: v for k, v in params.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        """SGLang's `sampling_params` JSON: max_new_tokens (OpenAI servers default to
        other lengths), then the fields that differ from the defaults (a server fills in
        the rest the same way, and an OpenAI server is sent no field it was not asked for)."""
        defaults = SamplingParams()
        return {"max_new_tokens": self.max_new_tokens,
                **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if getattr(self, f.name) != getattr(defaults, f.name)}}

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if not self.stop_regex:  # SGLang's frontend sends an empty list on every gen
            self.stop_regex = None
        if isinstance(self.json_schema, dict):  # SGLang takes a string; a dict means the same
            self.json_schema = json.dumps(self.json_schema)

    @property
    def constraint(self) -> tuple[str, str] | None:
        """(kind, source) of the request's structured-output constraint, if any."""
        for kind in CONSTRAINT_KINDS:
            if getattr(self, kind) is not None:
                return kind, getattr(self, kind)
        return None

    @property
    def has_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or
                    self.repetition_penalty != 1.0 or self.logit_bias)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    def verify(self) -> None:
        """Raise ValueError naming the offending field and the accepted range."""
        for name, default in _NOT_YET_SUPPORTED.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"sampling_params.{name}: not supported by this version of sglbatch yet; "
                    f"leave it at its default ({default!r})"
                )
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
             "an integer >= 0"),
            ("temperature", math.isfinite(self.temperature) and self.temperature >= 0,
             "a finite number >= 0 (0 = greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 1, "-1 (disabled) or >= 1"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 2.0, "in (0, 2]"),
            ("min_new_tokens", isinstance(self.min_new_tokens, int) and
             0 <= self.min_new_tokens <= self.max_new_tokens,
             "an integer in [0, max_new_tokens]"),
            ("n", isinstance(self.n, int) and self.n >= 1, "an integer >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"sampling_params.{name} must be {expected}, got {getattr(self, name)!r}"
                )
        constraints = [k for k in CONSTRAINT_KINDS if getattr(self, k) is not None]
        if len(constraints) > 1:
            raise ValueError(f"sampling_params: {' and '.join(constraints)} are both set; a "
                             "request takes one constraint (json_schema, regex or ebnf)")
        for kind in constraints:
            if not isinstance(getattr(self, kind), str):
                raise ValueError(f"sampling_params.{kind} must be a string, got "
                                 f"{type(getattr(self, kind)).__name__}")
        if self.logit_bias is not None:
            try:
                self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except (AttributeError, TypeError, ValueError):
                raise ValueError("sampling_params.logit_bias must map token ids to numbers, "
                                 f"e.g. {{\"1234\": -100}}; got {self.logit_bias!r}") from None
        if self.custom_params is not None and not isinstance(self.custom_params, dict):
            raise ValueError("sampling_params.custom_params must be a dict, got "
                             f"{type(self.custom_params).__name__}")
        if self.sampling_seed is not None and not isinstance(self.sampling_seed, int):
            raise ValueError(
                f"sampling_params.sampling_seed must be an integer, got {self.sampling_seed!r}"
            )
