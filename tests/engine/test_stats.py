"""The engine's step tally: steps bucketed by batch size, summed across replicas."""

from __future__ import annotations

import pickle

from sglbatch.bench.step_sizes import step_rows
from sglbatch.engine.stats import EngineStats, batch_size_bucket


def test_batch_sizes_fall_in_power_of_two_buckets():
    assert [batch_size_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 256, 257)] == \
        [1, 2, 4, 4, 8, 8, 16, 256, 512]


def test_step_tally_splits_by_mode_and_batch_size_and_merges():
    before = EngineStats()
    stats = EngineStats()
    stats.on_step("extend", 3, 300, 0.5)
    stats.on_step("decode", 3, 3, 0.02)
    stats.on_step("decode", 4, 4, 0.03)
    stats.on_step("decode", 1, 1, 0.01)
    stats.on_step("extend", 1, 40, 0.25)
    # A replica's snapshot travels pickled; replicas' tallies add up.
    replica = pickle.loads(pickle.dumps(stats.snapshot()))
    total = EngineStats.merged([stats, replica])
    rows = step_rows(before, total)
    assert [(r["mode"], r["batch_sizes"], r["steps"], r["tokens"]) for r in rows] == [
        ("extend", "all", 4, 680), ("decode", "1", 2, 2), ("decode", "3-4", 4, 14)]
    assert rows[2]["seconds"] == 2 * (0.02 + 0.03)
    # Only the steps between the two snapshots count.
    assert step_rows(stats.snapshot(), total)[0]["steps"] == 2
