"""CUDA graphs for decode steps: one graph per bucketed batch size, all sharing one memory pool.

A decode step (one new token per sequence) has the same kernels for a given batch size; only
the input values change. Replaying a captured graph skips the ~15 µs of host work per kernel
launch, which dominates small-batch decode. Inputs are copied into static buffers, rows past
the real batch are padding (slot -1: nothing stored; context of one token: a finite, ignored
result).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from distllm.layers.attention import AttentionMetadata, forward_context
from distllm.logger import init_logger

logger = init_logger(__name__)


def graph_batch_sizes(max_num_seqs: int, limit: int = 256) -> list[int]:
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if top not in sizes:
        sizes.append(top)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: Callable, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int,
                 hidden_size: int, dtype: torch.dtype, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.hidden = torch.zeros((n, hidden_size), dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            max_query_len=1,
            # The kernels size their grid from this host value: the model maximum is valid for every replay.
            max_seq_len=self.max_model_len,
        )

    def _run(self, bs: int) -> None:
        with forward_context(self._meta(bs), self.kv_caches):
            out = self.model(self.input_ids[:bs], self.positions[:bs])
        self.hidden[:bs].copy_(out)

    @torch.inference_mode()
    def capture(self) -> None:
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info()[0]
        for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            self._run(bs)  # warm-up: Triton compiles, cuBLAS picks kernels
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self._run(bs)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[bs] = g
        torch.cuda.synchronize()
        used = (free0 - torch.cuda.mem_get_info()[0]) / 2**30
        logger.info("CUDA graphs: captured %d decode batch sizes (1..%d) in %.2f s, %.2f GiB",
                    len(self.sizes), self.max_bs, time.perf_counter() - t0, used)

    def can_run(self, num_reqs: int, num_tokens: int) -> bool:
        return num_tokens == num_reqs and num_reqs <= self.max_bs

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= b)
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(meta.slot_mapping, non_blocking=True)
        m = meta.block_tables.shape[1]
        self.block_tables[:b, :m].copy_(meta.block_tables, non_blocking=True)
        self.seq_lens[:b].copy_(meta.seq_lens, non_blocking=True)
        if bs > b:
            self.input_ids[b:bs].zero_()
            self.positions[b:bs].zero_()
            self.slot_mapping[b:bs].fill_(-1)
            self.seq_lens[b:bs].fill_(1)
        self.graphs[bs].replay()
        return self.hidden[:b]
