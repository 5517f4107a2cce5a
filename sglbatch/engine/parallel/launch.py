"""Starting a tensor-parallel engine's model side: rank 0's runner in this process (the
engine thread), ranks 1..tp-1 in worker processes, joined in one process group."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sglbatch.engine.config import EngineConfig, ModelConfig
from sglbatch.engine.model_runner import ModelRunner
from sglbatch.engine.parallel.group import TPGroup, open_store, rank_device
from sglbatch.engine.parallel.peers import Peers
from sglbatch.engine.parallel.shard import plan_shards
from sglbatch.engine.parallel.worker import run_worker

# Loading a shard (and on CUDA capturing graphs) may take this long on a worker.
STARTUP_TIMEOUT_S = 600.0


def create_model_runner(config: EngineConfig, model_dir: Path) -> ModelRunner:
    """The engine's model runner: the whole model here, or rank 0 of `tp_size` ranks."""
    if config.tp_size == 1:
        return ModelRunner(config, model_dir)
    plan_shards(ModelConfig.from_dir(model_dir), config.tp_size)  # refuse before spawning
    threads = config.num_threads or threads_per_rank(config)
    torch.set_num_threads(threads)
    store = open_store(0, config.tp_size, is_master=True)
    peers = Peers(run_worker, config.tp_size, (config, model_dir, store.port, threads))
    group = None
    try:
        peers.expect("joining", STARTUP_TIMEOUT_S)
        group = TPGroup(store, 0, config.tp_size,
                        rank_device(config.device, config.base_gpu_id, 0))
        runner = ModelRunner(config, model_dir, group, peers)
        peers.expect("ready", STARTUP_TIMEOUT_S)
        return runner
    except BaseException:
        peers.close()
        if group is not None:
            group.close()
        raise


def threads_per_rank(config: EngineConfig) -> int:
    """CPU ranks share the cores: with more torch threads than cores, OpenMP workers stop
    spin-waiting and every op pays a wake-up. (CUDA ranks need few host threads anyway.)"""
    return max(1, len(os.sched_getaffinity(0)) // config.tp_size)
