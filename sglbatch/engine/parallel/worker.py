"""A tensor-parallel worker process (ranks 1..tp-1): it builds its shard of the model side
(model, attention backend, KV pool of its heads, its copy of the req -> token table) and
follows rank 0's steps until told to stop, until rank 0 is gone (EOF on the pipe), or until
a collective fails (a peer died): it never outlives the engine."""

from __future__ import annotations

import logging
import pickle
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from sglbatch.engine.config import EngineConfig
from sglbatch.engine.model_runner import ModelRunner
from sglbatch.engine.parallel.group import TPGroup, open_store, rank_device

logger = logging.getLogger(__name__)


def run_worker(conn: Connection, rank: int, config: EngineConfig, model_dir: Path,
               store_port: int, num_threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[tp{rank}] %(levelname)s %(message)s")
    torch.set_num_threads(num_threads)
    group = runner = None
    try:
        conn.send("joining")  # alive and imported: rank 0 may now wait in the rendezvous
        device = rank_device(config.device, config.base_gpu_id, rank)
        group = TPGroup(open_store(store_port, config.tp_size, is_master=False), rank,
                        config.tp_size, device)
        runner = ModelRunner(config, model_dir, group)
        conn.send("ready")
        while True:
            try:
                inputs = pickle.loads(conn.recv_bytes())
            except EOFError:  # rank 0's process is gone
                break
            if inputs is None:  # shutdown
                break
            runner.follow(inputs)
    except Exception:
        logger.exception("tensor-parallel rank %d failed", rank)
        try:
            conn.send(traceback.format_exc(limit=3))
        except OSError:
            pass
        sys.exit(1)
    finally:
        if group is not None:
            group.close()
