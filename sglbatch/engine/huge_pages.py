"""Host tensors on transparent huge pages, for the memory every decode step reads.

A decode step streams every weight once, and reads each request's K/V one 128-byte row per
key, and a request's keys sit apart in the pool (one slot per step, among the batch's). With
4 KiB pages that is a TLB miss every 4 KiB of weights, and for rows far apart nearly one per
row; a 2 MiB page covers 512 times as much (the README has what it measured). Linux backs
`torch.empty`'s memory with huge pages only where THP is "always"; many machines, this one
included, have it on "madvise", so the packed weights and the KV pool ask for them.
"""

from __future__ import annotations

import logging
import math
import mmap

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE_BYTES = 2 << 20


def _asks_for_huge_pages(nbytes: int) -> bool:
    # Smaller than a huge page: it could not fill one. No MADV_HUGEPAGE: not Linux.
    return nbytes >= HUGE_PAGE_BYTES and hasattr(mmap, "MADV_HUGEPAGE")


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor in memory the kernel is asked to back with huge pages.

    Off Linux, and for tensors smaller than one huge page, it is `torch.empty`'s; where the
    kernel has no transparent huge pages, the mapping keeps 4 KiB ones. The tensor keeps its
    mapping alive.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if not _asks_for_huge_pages(nbytes):
        return torch.empty(shape, dtype=dtype)
    # One huge page extra, so the tensor can start on a huge-page boundary.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE_BYTES,
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError as err:  # a kernel built without THP: ordinary pages still work
        logger.debug("no transparent huge pages (%s): 4 KiB pages it is", err)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE_BYTES
    return raw[start:start + nbytes].view(dtype).view(shape)


def on_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU tensor's contiguous copy on huge pages, or `tensor.contiguous()` where it would
    not get any: a strided view is copied once, straight into its place."""
    if not _asks_for_huge_pages(tensor.nbytes):
        return tensor.contiguous()
    return empty_on_huge_pages(tuple(tensor.shape), tensor.dtype).copy_(tensor)
