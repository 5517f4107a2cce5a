"""The tensor-parallel process group (NCCL on CUDA, gloo on the CPU) and the two collectives
the sharded model needs: the all-reduce after row-parallel layers and the vocabulary-parallel
embedding, and gathering vocabulary-parallel logits to rank 0 (the only rank that samples)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

# A collective waits this long for a rank that neither answers nor dies (a dead rank's
# sockets close, which fails its peers' collectives at once).
COLLECTIVE_TIMEOUT_S = 120.0


class RankLost(RuntimeError):
    """A tensor-parallel rank died, or the ranks fell out of step: the group cannot run
    another step and the engine must stop."""


def rank_device(device: str, base_gpu_id: int, rank: int) -> torch.device:
    """Rank `rank` of an engine runs on GPU base_gpu_id + rank (a data-parallel replica
    passes its own base_gpu_id)."""
    return torch.device("cuda", base_gpu_id + rank) if device == "cuda" else torch.device(device)


def open_store(port: int, size: int, is_master: bool) -> dist.TCPStore:
    """Rank 0 hosts the rendezvous store on a free loopback port (port 0 picks one, read
    back as `.port`); the workers connect to it."""
    return dist.TCPStore("127.0.0.1", port, size, is_master=is_master, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


class TPGroup:
    def __init__(self, store: dist.Store, rank: int, size: int, device: torch.device):
        self.rank, self.size = rank, size
        # One default group per process: each engine's ranks live in their own processes
        # (rank 0 in the caller's), so a process hosts at most one tensor-parallel engine.
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process: "
                               "one tensor-parallel engine per process")
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
            world_size=size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
            device_id=device if device.type == "cuda" else None)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x)
        return x

    def gather_vocab(self, logits: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Each rank's [tokens, chunk] logits -> [tokens, vocab_size] on rank 0, None on the
        others (the padding columns past vocab_size dropped)."""
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :vocab_size] if parts is not None else None

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
