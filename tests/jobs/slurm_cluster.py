"""A real one-node SLURM cluster on localhost (Debian's slurm-wlm), for tests that submit jobs.

Everything the cluster writes (slurm.conf, munge key and socket, state, spool, logs) lives under
one work directory; the daemons run in the foreground as children of this process on free ports,
so they neither clash with a system SLURM/munge nor outlive the test session. Slurm's commands
find this cluster only through ``SLURM_CONF``, which is set in ``SlurmCluster.env`` (pass it as
``env=`` to subprocesses), never in ``os.environ``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TOOLS = ["slurmctld", "slurmd", "sbatch", "sinfo", "munged"]


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started here; the message says why (daemon log tail)."""


@dataclass
class SlurmCluster:
    workdir: Path
    conf: Path  # the slurm.conf written for this cluster
    node: str  # the single node's name (this host's short hostname)
    partition: str  # the default partition ("debug")
    env: dict[str, str]  # os.environ + SLURM_CONF: use as env= for sbatch/squeue/...
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, timeout: float = 300, check: bool = True,
            **kw) -> subprocess.CompletedProcess:
        """Run a SLURM command (e.g. "sbatch", "--wait", ...) against this cluster."""
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=check, **kw)

    def logs(self, lines: int = 20) -> str:
        """The tail of each daemon's log, for error messages: <name>.log (slurm's LogFile,
        timestamped) once it has content, else <name>.out (its stderr: early errors, munged)."""
        out = []
        for name in self.procs:
            log = self.workdir / f"{name}.log"
            if not (log.exists() and log.stat().st_size):
                log = self.workdir / f"{name}.out"
            out.append(f"--- {log.name} ---\n{_tail(log, lines)}")
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel leftover jobs, then stop the daemons (slurmd first, munged last)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", f"--user={os.getuid()}"], env=self.env,
                           capture_output=True, timeout=30, check=False)
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_installed() -> None:
    """apt-get install the SLURM daemons/clients and munge if any tool is missing."""
    if all(shutil.which(t) for t in TOOLS):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm is not installed and apt-get is not usable "
                               "(needs root and apt)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                         check=False)
    if res.returncode != 0:  # stale package lists: refresh once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=900,
                       check=False)
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                             check=False)
    if res.returncode != 0 or not all(shutil.which(t) for t in TOOLS):
        raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed:\n"
                               f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}")


def _node_hardware() -> str:
    """`slurmd -C`'s CPU layout (CPUs/Boards/Sockets/Cores/Threads) with a modest RealMemory,
    so slurmd registers without a mismatch and never holds back jobs for memory."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=60,
                         check=False)
    words = out.stdout.splitlines()[0].split() if out.returncode == 0 and out.stdout else []
    keep = [w for w in words if w.split("=")[0] in
            ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")]
    return " ".join(keep or [f"CPUs={os.cpu_count() or 1}"]) + " RealMemory=1000"


def _write_conf(workdir: Path, node: str, munge_socket: Path) -> Path:
    for d in ("state", "spool"):
        (workdir / d).mkdir(exist_ok=True)
    conf = workdir / "slurm.conf"
    conf.write_text(f"""\
ClusterName=pytest
# NodeAddr/ctld address pinned to 127.0.0.1: works even if the hostname does not resolve.
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
# Our own munged (own key and socket), so a system munge is neither needed nor disturbed.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={workdir}/state
SlurmdSpoolDir={workdir}/spool
SlurmctldPidFile={workdir}/slurmctld.pid
SlurmdPidFile={workdir}/slurmd.pid
SlurmctldLogFile={workdir}/slurmctld.log
SlurmdLogFile={workdir}/slurmd.log
# No cgroups: track processes by /proc and bind nothing (works in containers/gVisor).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def start_local_slurm(workdir: Path, timeout: float = 60) -> SlurmCluster:
    """Install (if needed) and start munged + slurmctld + slurmd on this host; return once
    `sinfo` shows the node idle. Raises SlurmUnavailable with the daemons' log tails if not."""
    ensure_installed()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o700)  # munged refuses keys in group/world-writable directories
    node = socket.gethostname().split(".")[0]
    # A unix socket path must fit in 108 bytes; fall back to a short private dir.
    sock_dir = workdir if len(str(workdir)) < 90 else Path(tempfile.mkdtemp(prefix="munge"))
    munge_socket = sock_dir / "munge.sock"
    key = workdir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
    conf = _write_conf(workdir, node, munge_socket)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(workdir, conf, node, "debug", env)

    def launch(name: str, cmd: list[str]) -> None:
        # Foreground (-F/-D) children: we own their lifetime. In the foreground slurm copies
        # its log to stderr and munged logs only there, so keep stderr apart in <name>.out.
        with open(workdir / f"{name}.out", "ab") as log:
            cluster.procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=log,
                                                   stdin=subprocess.DEVNULL)

    try:
        launch("munged", ["munged", "-F", "--force", f"--key-file={key}",
                          f"--socket={munge_socket}", f"--pid-file={workdir}/munged.pid",
                          f"--seed-file={workdir}/munged.seed"])
        _wait(cluster, lambda: munge_socket.exists(), timeout, "munged socket")
        launch("slurmctld", ["slurmctld", "-D", "-i"])
        launch("slurmd", ["slurmd", "-D"])
        _wait(cluster, lambda: _node_state(cluster) == "idle", timeout, f"node {node} idle")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_state(cluster: SlurmCluster) -> str:
    res = cluster.run("sinfo", "-h", "-N", "-o", "%T", timeout=30, check=False)
    return res.stdout.strip() if res.returncode == 0 else ""


def _wait(cluster: SlurmCluster, ready, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:.0f}s"
            raise SlurmUnavailable(f"waiting for {what}: {why}\n{cluster.logs()}")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running one-node SLURM cluster for the session (skips, with the reason, if it cannot
    be installed or started here). Submit with `cluster.run("sbatch", ...)` or env=cluster.env."""
    try:
        cluster = start_local_slurm(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as e:
        pytest.skip(f"local SLURM unavailable: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
