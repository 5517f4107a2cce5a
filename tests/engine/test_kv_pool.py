"""KV pool and request table accounting."""

from __future__ import annotations

import pytest
import torch

from sglbatch.engine.kv_pool import KVPool, ReqToTokenPool


def test_alloc_free_round_trip_and_exhaustion():
    pool = KVPool(10, num_layers=2, num_kv_heads=1, head_dim=4, dtype=torch.float32)
    a = pool.alloc(6)
    b = pool.alloc(4)
    assert pool.alloc(1) is None and pool.num_free == 0
    assert sorted(torch.cat([a, b]).tolist()) == list(range(1, 11))  # slot 0 is never given
    pool.free(a)
    assert pool.num_free == 6
    c = pool.alloc(6)
    assert sorted(c.tolist()) == sorted(a.tolist())
    pool.free(b)
    pool.free(c)
    assert pool.num_free == 10
    with pytest.raises(RuntimeError, match="double free"):
        pool.free(torch.tensor([1]))


def test_scratch_slot_is_zero_and_kv_lands_in_its_slots():
    pool = KVPool(4, num_layers=1, num_kv_heads=2, head_dim=3, dtype=torch.float32)
    assert torch.count_nonzero(pool.k_buffers[0][:, 0]) == 0
    slots = pool.alloc(2)
    k = torch.randn(2, 2, 3)
    pool.set_kv(0, slots, k, -k)
    k_out, v_out = pool.get_kv(0, slots)
    assert torch.equal(k_out, k.transpose(0, 1)) and torch.equal(v_out, -k.transpose(0, 1))


def test_req_to_token_rows():
    table = ReqToTokenPool(2, max_context_len=8)
    rows = {table.alloc(), table.alloc()}
    assert rows == {0, 1} and table.alloc() is None
    table.free(0)
    assert table.num_free == 1 and table.alloc() == 0


def test_table_changes_reach_a_separate_device_table_in_one_commit():
    pool = ReqToTokenPool(3, 16)
    pool.table = torch.zeros_like(pool.host)  # stands in for the GPU copy
    pool.write(0, 0, torch.tensor([5, 6, 7]))
    pool.write(2, 4, torch.tensor([9]))
    pool.write(0, 1, torch.tensor([8]))  # the same span again: the last write wins
    pool.write_points([1, 2], [3, 5], torch.tensor([11, 12]))  # a decode step's slots
    assert not pool.table.any()  # nothing sent before the commit
    pool.commit()
    assert torch.equal(pool.table, pool.host)
    assert pool.host[0, :3].tolist() == [5, 8, 7] and pool.host[2, 4:6].tolist() == [9, 12]
    assert pool.host[1, 3] == 11
    pool.commit()  # nothing new: no-op
    assert torch.equal(pool.table, pool.host)


def test_a_mirrored_table_hands_out_every_change_once():
    """Rank 0's table (`mirrored`) gives the other ranks' copies what changed since its last
    hand-out: spans and a decode step's points alike."""
    source, copy = ReqToTokenPool(3, 16, mirrored=True), ReqToTokenPool(3, 16)
    source.write(0, 0, torch.tensor([5, 6, 7]))
    source.write_points([1, 0], [0, 3], torch.tensor([4, 9]))
    copy.apply(source.take_unsent())
    assert torch.equal(copy.host, source.host)
    assert [t.numel() for t in source.take_unsent()] == [0, 0, 0]
