"""Real servers on loopback: `sglbatch serve` in a subprocess, driven over HTTP. The
session-wide `server` and `client` fixtures live in tests/conftest.py (jobs tests use them too)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A running `sglbatch serve`; `url` is its base URL, `v1` the OpenAI base URL."""

    proc: subprocess.Popen
    url: str
    log: Path
    api_key: str | None

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp_dir: Path, *args: str, api_key: str | None = None,
                 timeout: float = 180, entry: tuple[str, ...] = ("-m", "sglbatch")
                 ) -> ServerProcess:
    """Start a server and wait for its "serving ... at URL" line (the socket is bound).
    `entry`: what python runs in place of `-m sglbatch` (e.g. a fault-injecting script)."""
    port = free_port()
    log = tmp_dir / f"server-{port}.log"
    cmd = [sys.executable, *entry, "serve", "--port", str(port),
           "--data-dir", str(tmp_dir / "data"), *args]
    if api_key:
        cmd += ["--api-key", api_key]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "sglbatch serving" in log.read_text():
            return ServerProcess(proc, f"http://127.0.0.1:{port}", log, api_key)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"server did not start in {timeout}s:\n{log.read_text()}")
