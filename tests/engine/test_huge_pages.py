"""Host tensors on transparent huge pages: the packed weights and the KV pool ask for them."""

from __future__ import annotations

import gc
import mmap
import sys
from pathlib import Path

import pytest
import torch

from sglbatch.engine.huge_pages import HUGE_PAGE_BYTES, empty_on_huge_pages, on_huge_pages
from sglbatch.engine.kv_pool import KVPool
from sglbatch.engine.layers.linear import pack_bf16_weight

linux_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"),
    reason="transparent huge pages are a Linux feature")


def _advised_huge(address: int) -> bool:
    """Whether the mapping holding `address` carries MADV_HUGEPAGE ("hg" in its VmFlags)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: start-end perms ...
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@linux_thp
def test_a_large_tensor_starts_on_a_huge_page_in_advised_memory_and_outlives_its_mapping():
    t = empty_on_huge_pages((3, 4096, 257), torch.bfloat16)
    assert t.shape == (3, 4096, 257) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % HUGE_PAGE_BYTES == 0
    assert _advised_huge(t.data_ptr())
    gc.collect()  # only the tensor refers to the mapping now
    t.fill_(1.5)
    assert t.float().sum().item() == 1.5 * t.numel()


def test_small_tensors_stay_as_they_are():
    small = torch.ones(1000)
    assert on_huge_pages(small) is small
    assert empty_on_huge_pages((10, 10), torch.float32).shape == (10, 10)


@linux_thp
def test_packed_weights_are_copied_onto_huge_pages_unchanged():
    weight = torch.randn(2048, 576).to(torch.bfloat16)
    packed = pack_bf16_weight(weight)
    assert _advised_huge(packed.data_ptr())
    # [out/64, in/2, 64, 2]: column c of block b, input pair i is weight[64b + c, 2i:2i+2]
    assert torch.equal(packed.permute(0, 2, 1, 3).reshape(2048, 576), weight)


@linux_thp
def test_the_cpu_kv_pool_is_on_huge_pages_and_keeps_its_zeroed_scratch_slot():
    pool = KVPool(20000, num_layers=2, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16)
    for buf in (*pool.k_buffers, *pool.v_buffers):
        assert _advised_huge(buf.data_ptr())
        assert torch.count_nonzero(buf[:, 0]) == 0
    slots = pool.alloc(5)
    k = torch.randn(5, 3, 64).to(torch.bfloat16)
    pool.set_kv(1, slots, k, -k)
    assert torch.equal(pool.get_kv(1, slots)[0], k.transpose(0, 1))


def test_a_pool_on_another_device_is_made_there():
    pool = KVPool(20000, num_layers=1, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16,
                  device="meta")
    assert pool.k_buffers[0].device.type == "meta"
