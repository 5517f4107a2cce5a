"""Which attention backend `auto` picks, and the errors for backends that cannot run."""

from __future__ import annotations

import pytest
import torch

from sglbatch.engine import attention
from sglbatch.engine.attention import cpu_kernels, create_attention_backend, resolve_backend_name
from sglbatch.engine.config import EngineConfig
from sglbatch.engine.kv_pool import KVPool


@pytest.mark.parametrize("installed,expected", [
    ({"flashinfer", "triton"}, "flashinfer"),
    ({"triton"}, "triton"),
    (set(), "torch"),
])
def test_auto_on_cuda_prefers_flashinfer_then_triton(monkeypatch, installed, expected):
    monkeypatch.setattr(attention, "is_installed", lambda module: module in installed)
    assert resolve_backend_name("auto", "cuda", torch.bfloat16) == expected
    # FlashInfer has no fp32 kernels.
    assert resolve_backend_name("auto", "cuda", torch.float32) == \
        ("triton" if "triton" in installed else "torch")


def test_auto_on_cpu_is_unchanged():
    expected = "cpu" if cpu_kernels.load() is not None else "torch"
    assert resolve_backend_name("auto", "cpu") == expected


@pytest.mark.parametrize("kwargs,message", [
    ({"attention_backend": "flash"}, "attention_backend='flash' is not one of"),
    ({"attention_backend": "flashinfer", "device": "cpu"}, "needs device='cuda'"),
    ({"attention_backend": "cpu", "device": "cuda"}, "runs on device='cpu' only"),
    ({"cuda_graph_max_bs": 0}, "cuda_graph_max_bs must be > 0"),
])
def test_config_refuses_backends_that_cannot_run(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_gpu_flag_defaults():
    config = EngineConfig()
    assert config.cuda_graph_max_bs == 160 and not config.disable_cuda_graph


@pytest.mark.skipif(attention.is_installed("flashinfer"), reason="flashinfer is installed")
def test_flashinfer_not_installed_is_a_clear_error():
    pool = KVPool(4, 1, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="needs flashinfer-python"):
        create_attention_backend("flashinfer", "cuda", pool, 1, 1, 8)


def test_flashinfer_pages_view_the_pool_without_a_copy():
    from sglbatch.engine.attention.flashinfer_backend import one_token_pages

    pool = KVPool(6, 1, 3, 8, torch.float32)
    buf = pool.k_buffers[0]
    buf.copy_(torch.randn(buf.shape))
    pages = one_token_pages(buf)
    assert pages.shape == (7, 1, 3, 8) and pages.data_ptr() == buf.data_ptr()
    assert torch.equal(pages[:, 0], buf.transpose(0, 1))
    assert pages.stride(0) % pages.stride(1) == 0  # page stride a multiple of token stride


def test_device_auto_is_the_default_and_resolves_once(caplog):
    from sglbatch.engine.config import auto_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    auto_device.cache_clear()
    with caplog.at_level("INFO", logger="sglbatch.engine.config"):
        assert EngineConfig().device == expected
        assert EngineConfig(device="auto").device == expected
    logged = [r.getMessage() for r in caplog.records if "device=auto" in r.getMessage()]
    assert len(logged) == 1 and f"using {expected}" in logged[0]
    assert EngineConfig(device="cpu").device == "cpu"
    with pytest.raises(ValueError, match=r"device='tpu' is not one of \['auto', 'cpu', 'cuda'\]"):
        EngineConfig(device="tpu")


def test_a_lock_left_by_a_killed_kernel_build_is_removed_not_waited_on_forever(tmp_path):
    import os
    import time

    lock = tmp_path / "lock"
    assert not cpu_kernels.clear_stale_lock(tmp_path)  # no build, no lock
    lock.touch()
    old = time.time() - cpu_kernels.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert cpu_kernels.clear_stale_lock(tmp_path) and not lock.exists()
    lock.touch()  # young: waited on while a build could hold it, then cleared
    start = time.monotonic()
    assert cpu_kernels.clear_stale_lock(tmp_path, max_age_s=0.5) and not lock.exists()
    assert time.monotonic() - start >= 0.3
