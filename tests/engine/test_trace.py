"""Trace ranges cost nothing unless a profiler runs, and show up in its trace when one does."""

from __future__ import annotations

import json

import torch

from sglbatch.engine import trace
from sglbatch.engine.profiler import ProfileSession


def test_ranges_are_a_shared_no_op_unless_profiling():
    if trace.is_active():  # SGLBATCH_TRACE=1 in the environment
        return
    assert trace.trace_range("sglbatch.x") is trace.trace_range("sglbatch.y")
    trace.enable()
    try:
        assert trace.trace_range("sglbatch.x") is not trace.trace_range("sglbatch.x")
    finally:
        trace.disable()
    assert not trace.is_active()


def test_session_records_ranges_and_ops(tmp_path):
    session = ProfileSession(tmp_path, name="unit", record_shapes=True)
    session.start()
    with trace.trace_range("sglbatch.outer"), trace.trace_range("sglbatch.inner"):
        torch.mm(torch.ones(8, 8), torch.ones(8, 8))
    path = session.stop()
    assert not trace.is_active() or trace._forced
    names = {e.get("name") for e in json.loads(path.read_text())["traceEvents"]}
    assert {"sglbatch.outer", "sglbatch.inner", "aten::mm"} <= names
    assert path.parent == tmp_path and path.name.startswith("unit-")
    top = {row["name"] for row in session.top_ops(50)}
    assert "aten::mm" in top


def test_session_arguments_are_checked(tmp_path):
    import pytest

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_steps"):
            ProfileSession(tmp_path, num_steps=bad)
    with pytest.raises(ValueError, match="activities"):
        ProfileSession(tmp_path, activities=["TPU"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="output_dir"):
        ProfileSession(blocker / "sub").start()
    assert not trace.is_active() or trace._forced
