"""Model registry: config.json's architecture name -> model class.

Each family is one module of this package exporting `ARCHITECTURES`, a dict from the names
config.json's "architectures" uses to its model class. The registry finds the modules itself,
so adding a family adds one module (and its test) and touches nothing else.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from torch import nn

from sglbatch.engine.config import ModelConfig
from sglbatch.engine.parallel.group import TPGroup
from sglbatch.engine.parallel.shard import RankShard


@functools.cache
def registry() -> dict[str, type[nn.Module]]:
    found: dict[str, type[nn.Module]] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.update(getattr(module, "ARCHITECTURES", {}))
    return found


def supported_architectures() -> list[str]:
    return sorted(registry())


def model_class(config: ModelConfig) -> type[nn.Module]:
    cls = registry().get(config.architecture)
    if cls is None:
        raise ValueError(f"architecture {config.architecture!r} (config.json \"architectures\") "
                         f"is not supported; supported: {supported_architectures()}")
    return cls


def create_model(config: ModelConfig, shard: RankShard | None = None,
                 group: TPGroup | None = None) -> nn.Module:
    """The whole model, or with `shard` and `group` one tensor-parallel rank's part of it."""
    return model_class(config)(config, shard, group)
