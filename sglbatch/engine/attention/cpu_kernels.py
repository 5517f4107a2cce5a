"""C++ kernels for the CPU, compiled on first use and cached on disk.

Each source in `csrc/` is its own extension module (`load(name)` builds `csrc/<name>.cpp`),
so a kernel's change rebuilds only that module. They are built with the machine's own
compiler (`-march=native`), so the build is keyed by the source, torch's version and the
CPU's feature flags. Where no compiler works, `load()` returns None and the caller stays
on plain torch.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
import time
from pathlib import Path
from types import ModuleType

import torch

from sglbatch.engine.model_source import cache_dir

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# fast-math lets the exp loop vectorize; the kernel never relies on inf or NaN arithmetic.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
# A build takes ~30 s here; a lock file this old was left by a build that was killed.
STALE_LOCK_S = 180.0


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_dir(source: Path) -> Path:
    # The shared headers are part of every build.
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + " ".join(CFLAGS).encode()
                         + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"{source.stem}-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_stale_lock(build_dir: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """torch's extension builder waits, with no time limit, for the lock file a build holds;
    a build that was killed leaves it behind, and every later start would hang. Wait while
    the lock is young enough to belong to a running build; once it is older than any build
    takes, it is a leftover: removed (True). False if there is (or is soon) no lock."""
    lock = build_dir / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return False
        if age >= max_age_s:
            break
        time.sleep(min(1.0, max_age_s - age))
    logger.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
    lock.unlink(missing_ok=True)
    return True


@functools.cache
def load(name: str = "decode_attention") -> ModuleType | None:
    """The compiled module of `csrc/<name>.cpp`, or None (logged once) if it cannot be
    built here."""
    from torch.utils import cpp_extension

    source = CSRC / f"{name}.cpp"
    build_dir = _build_dir(source)
    clear_stale_lock(build_dir)
    if not any(build_dir.glob("*.so")):
        logger.info("compiling the CPU kernel %s into %s (once, ~30 s)", name, build_dir)
    try:
        return cpp_extension.load(
            name=f"sglbatch_{name}", sources=[str(source)],
            build_directory=str(build_dir),
            extra_cflags=CFLAGS, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use plain torch
        logger.warning("CPU kernel %s unavailable (%s: %s); using plain torch", name,
                       type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None
