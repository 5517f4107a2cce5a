"""Flags generated from the config dataclasses: what Runtime sends a child `sglbatch serve`
is parsed back by serve's own parser into the same values."""

from __future__ import annotations

import pytest

from sglbatch.cli import parse_args
from sglbatch.config_flags import dataclass_kwargs, to_flags
from sglbatch.engine.config import EngineConfig
from sglbatch.server.args import ServerArgs


def test_runtime_flags_parse_back_to_the_same_values():
    values = {"port": 31234, "api_key": "k", "is_embedding": True, "max_upload_mb": 2.5,
              "model_path": "m", "kv_cache_gb": 0.25, "disable_radix_cache": True,
              "context_length": 64, "chat_template": None}
    flags, unknown = to_flags({**values, "mem_fraction_static": 0.8}, ServerArgs, EngineConfig)
    assert unknown == ["mem_fraction_static"]  # an SGLang flag serve does not take
    args = parse_args(["serve", *flags])
    parsed = {**dataclass_kwargs(args, ServerArgs), **dataclass_kwargs(args, EngineConfig)}
    assert {k: parsed[k] for k in values} == values
    defaults = parse_args(["serve"])
    assert ServerArgs(**dataclass_kwargs(defaults, ServerArgs)) == ServerArgs()


def test_a_bool_field_takes_only_a_bool():
    assert to_flags({"is_embedding": False}, ServerArgs) == ([], [])
    with pytest.raises(TypeError, match="is_embedding must be a bool"):
        to_flags({"is_embedding": "yes"}, ServerArgs)

