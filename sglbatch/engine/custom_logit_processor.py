"""Custom logit processors, serialized with the request as SGLang does.

A processor is a class whose `__call__(logits, custom_param_list)` returns new logits for the
rows that use it; `custom_param_list` holds each row's `sampling_params.custom_params` plus
`"__req__"` (the request). `to_str()` serializes the class with dill (the same JSON shape as
SGLang's, so processors written for SGLang load here). Loading one runs code the client
sent, so the engine refuses them unless started with `enable_custom_logit_processor`.
"""

from __future__ import annotations

import functools
import json
from abc import ABC, abstractmethod
from typing import Any

import torch

from sglbatch.engine.request import Req


class CustomLogitProcessor(ABC):
    @abstractmethod
    def __call__(self, logits: torch.Tensor,
                 custom_param_list: list[dict[str, Any]] | None = None) -> torch.Tensor:
        """Return the logits for these rows, changed as the processor sees fit."""

    @classmethod
    def to_str(cls) -> str:
        import dill

        return json.dumps({"callable": dill.dumps(cls).hex()})

    @classmethod
    def from_str(cls, json_str: str) -> CustomLogitProcessor:
        return load_processor(json_str)


@functools.lru_cache(maxsize=64)
def load_processor(json_str: str) -> CustomLogitProcessor:
    """An instance of the serialized processor class (deserialized once per distinct text)."""
    import dill

    try:
        processor = dill.loads(bytes.fromhex(json.loads(json_str)["callable"]))
    except Exception as e:  # any failure here is the client's serialized payload
        raise ValueError("custom_logit_processor: cannot load it; pass the string that "
                         f"YourProcessor.to_str() returns ({type(e).__name__}: {e})") from None
    instance = processor() if isinstance(processor, type) else processor
    if not callable(instance):
        raise ValueError("custom_logit_processor: the loaded object is not callable")
    return instance


def apply_custom_processors(logits: torch.Tensor, reqs: list[Req]) -> None:
    """Run each distinct processor once over the rows that use it, in place."""
    groups: dict[int, tuple[CustomLogitProcessor, list[int]]] = {}
    for i, req in enumerate(reqs):
        if req.custom_logit_processor is not None:
            groups.setdefault(id(req.custom_logit_processor),
                              (req.custom_logit_processor, []))[1].append(i)
    for processor, rows in groups.values():
        params = [{**(reqs[i].sampling_params.custom_params or {}), "__req__": reqs[i]}
                  for i in rows]
        index = torch.tensor(rows, device=logits.device)
        logits[index] = processor(logits[index], params).to(logits.dtype)
