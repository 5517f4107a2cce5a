"""CUDA graphs for the decode step (device cuda): the model's forward is captured once per
batch-size bucket and replayed, so a decode step costs a few launches instead of one per
kernel (hundreds for a small model, where launch overhead dominates).

A graph replays fixed addresses: the step's inputs are copied into static buffers, and a
batch is padded up to the next captured size. Padding rows decode a dummy token whose K/V
go to the pool's scratch slot 0 and whose attention reads one slot; their outputs are
dropped. Only backends with `supports_cuda_graph` qualify (their decode metadata must be
plain device tensors).
"""

from __future__ import annotations

import bisect
import logging

import torch
from torch import nn

from sglbatch.engine.attention.base import AttentionBackend
from sglbatch.engine.batch import ForwardBatch, ForwardMode
from sglbatch.engine.overlap import tensor_to_device

logger = logging.getLogger(__name__)


def capture_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to `max_bs` (which is always included): padding wastes
    at most 7 rows past 8."""
    sizes = [s for s in (1, 2, 4, *range(8, max_bs + 1, 8)) if s <= max_bs]
    return sizes if sizes[-1] == max_bs else [*sizes, max_bs]


class CudaGraphRunner:
    def __init__(self, model: nn.Module, backend: AttentionBackend, req_to_token: torch.Tensor,
                 max_bs: int):
        self.model = model
        self.backend = backend
        self.req_to_token = req_to_token
        self.sizes = capture_sizes(max_bs)
        n, device = self.sizes[-1], req_to_token.device

        def zeros(dtype=torch.int64):
            return torch.zeros(n, dtype=dtype, device=device)

        # Static inputs; their zero/one defaults are exactly the padding rows' values.
        self.input_ids, self.positions = zeros(), zeros()
        self.out_cache_loc, self.req_pool_indices = zeros(), zeros()
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.extend_start = torch.arange(n, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            self._capture_all()

    def _static_batch(self, bs: int) -> ForwardBatch:
        return ForwardBatch(
            ForwardMode.DECODE, self.input_ids[:bs], self.positions[:bs],
            self.out_cache_loc[:bs], self.req_pool_indices[:bs],
            torch.ones_like(self.extend_start[:bs]), self.extend_start[:bs], self.req_to_token,
            seq_lens_cpu=[1] * bs, prefix_lens_cpu=[0] * bs, extend_lens_cpu=[1] * bs)

    def _capture_all(self) -> None:
        pool = None
        # Largest first: the smaller graphs then fit in the memory pool it leaves.
        for bs in reversed(self.sizes):
            fb = self._static_batch(bs)

            def step(fb=fb, bs=bs) -> torch.Tensor:
                # Host-side only (points the backend at the static seq_lens), so capturing it
                # records nothing.
                self.backend.init_forward_metadata_graph(fb, self.seq_lens[:bs])
                return self.model(fb.input_ids, fb.positions, fb, self.backend)

            self.graphs[bs], self.outputs[bs], pool = self._capture(step, pool)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    @staticmethod
    def _capture(step, pool):
        """(graph, its static output, the memory pool to share with the next capture)."""
        # Warm up off the capture (Triton compiles, cuBLAS picks its kernels).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step()
        return graph, out, graph.pool()

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.mode == ForwardMode.DECODE and len(fb.seq_lens_cpu) <= self.sizes[-1]

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """The final hidden states [batch, hidden] of a decode batch."""
        bs = len(fb.seq_lens_cpu)
        padded = self.sizes[bisect.bisect_left(self.sizes, bs)]
        self.input_ids[:bs].copy_(fb.input_ids)
        self.positions[:bs].copy_(fb.positions)
        self.out_cache_loc[:bs].copy_(fb.out_cache_loc)
        self.req_pool_indices[:bs].copy_(fb.req_pool_indices)
        self.seq_lens[:bs].copy_(tensor_to_device(fb.seq_lens_cpu, torch.int32,
                                                  self.seq_lens.device))
        if padded > bs:  # the previous replay may have left real rows here
            for buf in (self.input_ids, self.positions, self.out_cache_loc,
                        self.req_pool_indices):
                buf[bs:padded].zero_()
            self.seq_lens[bs:padded].fill_(1)
        self.graphs[padded].replay()
        return self.outputs[padded][:bs]
