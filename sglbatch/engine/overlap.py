"""What the overlap schedule needs from the device side (SGLang's overlap scheduler): the
engine launches step N+1 before it reads step N's sampled tokens (`batch.LaunchedStep`),
so on a GPU the host's scheduling and output processing run while the device computes.

- `FutureTokenMap`: sampled ids stay on the device; the next step's inputs name them by
  placeholder and the device resolves them.
- `to_device`, `tensor_to_device`: host -> device copies that do not make the host wait
  for the device. A blocking copy from pageable memory waits for the stream, so every
  step's inputs would wait for the previous step's forward and the overlap would hide
  nothing.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; on CUDA through pinned memory, without waiting."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def tensor_to_device(values: list, dtype: torch.dtype | None,
                     device: torch.device) -> torch.Tensor:
    """`torch.tensor(values)` made on the host and moved as `to_device` does."""
    return to_device(torch.tensor(values, dtype=dtype, device="cpu"), device)


class FutureTokenMap:
    """A ring of sampled token ids on the device. `store` returns one placeholder per row,
    -(index + 1), which a later step's input ids may carry before the host has read the
    token; `resolve` swaps them for the stored ids on the device. Two steps' rows fit: the
    next step resolves the placeholders of the one before it, and the host replaces them
    with the values it read before scheduling the step after."""

    def __init__(self, max_rows: int, device: torch.device):
        self.max_rows = max_rows
        self.ids = torch.zeros(2 * max_rows, dtype=torch.int64, device=device)
        self._next = 0

    def store(self, next_ids: torch.Tensor) -> list[int]:
        n = next_ids.numel()
        if n > self.max_rows:
            raise ValueError(f"{n} rows sampled in one step; the map holds {self.max_rows}")
        if self._next + n > self.ids.numel():
            self._next = 0
        start, self._next = self._next, self._next + n
        self.ids[start:start + n] = next_ids
        return list(range(-start - 1, -start - n - 1, -1))

    def resolve(self, input_ids: torch.Tensor) -> torch.Tensor:
        index = (-input_ids - 1).clamp(min=0)
        return torch.where(input_ids < 0, self.ids[index], input_ids)
