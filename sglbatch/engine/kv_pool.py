"""Token-granular KV storage: a pool of K/V slots, and a table mapping requests to slots."""

from __future__ import annotations

import torch

from sglbatch.engine.huge_pages import empty_on_huge_pages
from sglbatch.engine.overlap import to_device


class KVPool:
    """Per-layer K and V buffers of shape [num_kv_heads, num_slots + 1, head_dim].

    Head-major, so gathering a batch's slots yields [kv_heads, tokens, head_dim]: the layout
    attention's matmuls want, with no transposing copy.

    Slot 0 is never handed out: it is a scratch slot that padded positions may write to,
    so backends need no branch for padding. Slots 1..num_slots are managed by a free list.
    The buffers are not zero-filled (that alone takes seconds at pool sizes in the GiBs):
    every slot a request's table names was written when allocated, and table entries
    nobody wrote point at slot 0, which is zeroed, so masked reads never meet NaN garbage.
    """

    def __init__(self, num_slots: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        if num_slots <= 0:
            raise ValueError(f"KV pool needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        shape = (num_kv_heads, num_slots + 1, head_dim)

        def empty() -> torch.Tensor:
            if torch.device(device).type == "cpu":
                return empty_on_huge_pages(shape, dtype)  # see huge_pages: scattered reads
            return torch.empty(shape, dtype=dtype, device=device)

        self.k_buffers = [empty() for _ in range(num_layers)]
        self.v_buffers = [empty() for _ in range(num_layers)]
        for buf in (*self.k_buffers, *self.v_buffers):
            buf[:, 0].zero_()
        self.free_all()

    @property
    def num_layers(self) -> int:
        return len(self.k_buffers)

    def free_all(self) -> None:
        # The free list lives on the host: allocation is bookkeeping, not device work.
        self._free = torch.arange(1, self.num_slots + 1, dtype=torch.int64, device="cpu")
        self._num_free = self.num_slots

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    @property
    def num_free(self) -> int:
        return self._num_free

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take `n` free slots (int64, on CPU), or None if fewer than `n` are free."""
        if n > self._num_free:
            return None
        start = self._num_free - n
        slots = self._free[start:self._num_free].clone()
        self._num_free = start
        return slots

    def free(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        if n == 0:
            return
        if self._num_free + n > self.num_slots:
            raise RuntimeError("KV pool double free: more slots returned than were taken")
        self._free[self._num_free:self._num_free + n] = slots.to(torch.int64).cpu()
        self._num_free += n

    def set_kv(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [tokens, kv_heads, head_dim], written to `slots`."""
        self.k_buffers[layer_id][:, slots] = k.transpose(0, 1)
        self.v_buffers[layer_id][:, slots] = v.transpose(0, 1)

    def get_kv(self, layer_id: int, slots: torch.Tensor | slice
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `slots` as [kv_heads, len(slots), head_dim]: views for a slice (see
        `as_span`), gathered copies for an index tensor."""
        k, v = self.k_buffers[layer_id], self.v_buffers[layer_id]
        if isinstance(slots, slice):
            return k[:, slots], v[:, slots]
        # index_select is several times faster than advanced indexing on CPU.
        return k.index_select(1, slots), v.index_select(1, slots)

    @staticmethod
    def as_span(slots: torch.Tensor) -> torch.Tensor | slice:
        """`slots` as a slice when they are consecutive (a prompt prefilled in one go
        usually is), so `get_kv` can return views instead of copying; else unchanged."""
        n = slots.numel()
        if n and int(slots[-1]) - int(slots[0]) == n - 1 and \
                bool((slots[1:] - slots[:-1] == 1).all()):
            return slice(int(slots[0]), int(slots[0]) + n)
        return slots


class ReqToTokenPool:
    """Row `i` lists the KV slots of the request holding row `i`, position by position.

    `table` is what the model reads, on its device; `host` is the copy bookkeeping reads and
    writes (the same tensor on the CPU). `write` and `write_points` change the host copy and
    remember the entries; `commit` sends every entry changed since to the device in one
    indexed write.
    With `mirrored` (rank 0 of a tensor-parallel engine), `take_unsent` also hands out the
    entries changed since its last call, for the other ranks' copies of the table.
    """

    def __init__(self, num_rows: int, max_context_len: int, device: str | torch.device = "cpu",
                 mirrored: bool = False):
        shape = (num_rows, max_context_len)
        self.host = torch.zeros(shape, dtype=torch.int64, device="cpu")
        self.table = self.host if torch.device(device).type == "cpu" else \
            torch.zeros(shape, dtype=torch.int64, device=device)
        # (rows, cols) index tensors of the entries changed since commit / since sent.
        self._changed: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._unsent: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if mirrored else None
        self.num_rows = num_rows
        self.free_all()

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        end = start + slots.numel()
        self.host[row, start:end] = slots
        if self._tracks_changes:
            self._remember(torch.full((end - start,), row, dtype=torch.int64, device="cpu"),
                           torch.arange(start, end, device="cpu"))

    def write_points(self, rows: list[int], cols: list[int], slots: torch.Tensor) -> None:
        """Entry (rows[i], cols[i]) becomes slots[i]: a decode step's one new slot per
        request, in one indexed write."""
        index = (torch.tensor(rows, dtype=torch.int64, device="cpu"),
                 torch.tensor(cols, dtype=torch.int64, device="cpu"))
        self.host[index] = slots
        if self._tracks_changes:
            self._remember(*index)

    @property
    def _tracks_changes(self) -> bool:
        return self.table is not self.host or self._unsent is not None

    def _remember(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        if self.table is not self.host:
            self._changed.append((rows, cols))
        if self._unsent is not None:
            self._unsent.append((rows, cols))

    def commit(self) -> None:
        if not self._changed:
            return
        rows, cols, values = self._entries(self._changed)
        self._changed = []
        self._put(rows, cols, values)

    def take_unsent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, cols, values) of the entries written since the last call (host tensors)."""
        entries = self._entries(self._unsent)
        self._unsent = []
        return entries

    def apply(self, entries: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Write entries taken from another copy's `take_unsent` (host and device)."""
        rows, cols, values = entries
        self.host[rows, cols] = values
        if self.table is not self.host:
            self._put(rows, cols, values)

    def _entries(self, changes: list[tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not changes:
            empty = torch.zeros(0, dtype=torch.int64, device="cpu")
            return empty, empty, empty
        rows = torch.cat([r for r, _ in changes])
        cols = torch.cat([c for _, c in changes])
        # Values come from the host copy as it is now: an entry written twice since the last
        # commit carries its final slot, whichever duplicate index the device applies.
        return rows, cols, self.host[rows, cols]

    def _put(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
        device = self.table.device
        self.table.index_put_((to_device(rows, device), to_device(cols, device)),
                              to_device(values, device))

    def free_all(self) -> None:
        self._free_rows = list(range(self.num_rows - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)
