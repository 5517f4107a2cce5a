"""Catching tensors created on the wrong device, without a GPU.

A tensor that a forward path creates with no `device=` lands on the CPU. On a GPU it then
meets CUDA tensors and the op raises (two such tensors crashed the first real GPU run), or
an index costs a synchronous copy. On the CPU every tensor is on the CPU, so running the
path proves nothing; what can be checked is how each tensor was created. `DeviceCheck`
records every factory call that names no device while it is active (in the thread that
entered it), with the first caller outside torch. Tensors deliberately kept on the host say
`device="cpu"`; everything else follows its inputs (`device=x.device`, `x.new_*`, `*_like`).
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Factory functions that take a `device=` and otherwise use the default device.
_FACTORIES = frozenset({
    torch.tensor, torch.as_tensor, torch.asarray, torch.scalar_tensor, torch.ones,
    torch.zeros, torch.full, torch.empty, torch.empty_strided, torch.arange, torch.linspace,
    torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm,
})
_TORCH_DIR = str(Path(torch.__file__).parent)


class DeviceCheck(TorchFunctionMode):
    """`with DeviceCheck() as check: ...` then `check.sites`: where a tensor was created
    with no device named ("file.py:123 torch.ones")."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None and not _copies_a_tensor(
                func, args):
            self.sites.append(f"{_caller()} torch.{func.__name__}")
        return func(*args, **kwargs)


def _copies_a_tensor(func: Any, args: tuple) -> bool:
    # as_tensor(t) / asarray(t) of an existing tensor keep its device.
    return func in (torch.as_tensor, torch.asarray) and bool(args) and \
        isinstance(args[0], torch.Tensor)


def _caller() -> str:
    for frame, line in traceback.walk_stack(sys._getframe(2)):
        path = frame.f_code.co_filename
        if not path.startswith(_TORCH_DIR) and not path.endswith("device_follow.py"):
            return f"{path}:{line}"
    return "?"


def checked(fn: Callable[..., Any], check: DeviceCheck) -> Callable[..., Any]:
    """`fn`, run under `check` in whichever thread calls it (e.g. the engine's)."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with check:
            return fn(*args, **kwargs)

    return wrapped


def assert_all_named(check: DeviceCheck) -> None:
    sites = sorted(set(check.sites))
    assert not sites, "tensors created with no device:\n" + "\n".join(sites)
