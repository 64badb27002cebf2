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
from distllm.ops.launch import precompile

logger = init_logger(__name__)

_FULL_ROWS_COPY_BYTES = 1 << 20
# A graph's attention sizes its split-KV grid for the longest context it may see (the kernels
# take max_seq_len from the host at capture). Graphs made for max_model_len thus launch mostly
# empty split programs when every context is short: 32 splits where 4 have keys for the 8B
# shape at batch 1 and 256 keys, ~1.5 µs more a layer (H200). So small batches, the ones that
# split, also get a graph made for contexts up to SHORT_CONTEXT, replayed while they fit. (With
# 512 keys, at most 8 splits: the two grids differ where (batch x kv heads a rank) < 66 on 132
# SMs, e.g. batch <= 8 for the 8B shape, <= 16 at TP=2 or for SmolLM2's 3 kv heads.)
SHORT_CONTEXT = 512
SHORT_GRAPH_MAX_BS = 16
# Batch sizes up to this one, and the largest, make the compile-only pass before capture: it
# costs one eager forward each even when every kernel is already compiled (~70 ms for the 8B
# shape on an H200; all 25 graphs' forwards took 1.7 s).
PRECOMPILE_MAX_BS = 32


def graph_batch_sizes(max_num_seqs: int, limit: int = 256) -> list[int]:
    top = min(max_num_seqs, limit)
    sizes = [s for s in (1, 2, 4, 8) if s <= top] + list(range(16, top + 1, 16))
    if top not in sizes:
        sizes.append(top)
    return sorted(set(sizes))


class DecodeGraphs:
    def __init__(self, model: Callable, kv_caches, max_num_seqs: int, max_model_len: int, block_size: int,
                 vocab_size: int, device: torch.device, logits_dtype: torch.dtype = torch.float32):
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        max_blocks = -(-max_model_len // block_size)
        n = self.max_bs
        # Static inputs. ids, positions and slots share one int64 buffer so that one host-to-device
        # copy fills all three: [ids (n) | positions (n) | slots (n)].
        self.packed = torch.zeros(3 * n, dtype=torch.int64, device=device)
        self.input_ids = self.packed[:n]
        self.positions = self.packed[n : 2 * n]
        self.slot_mapping = self.packed[2 * n :]
        self.slot_mapping.fill_(-1)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        # Pinned host staging for the same buffers. Two sets, used in turn: a step may be
        # prepared while the previous one's copies still wait in the stream.
        self._staging = [_Staging(n, max_blocks, pin=device.type == "cuda") for _ in range(2)]
        self._turn = 0
        # One static logits buffer for every bucket: per-bucket outputs left in the shared pool
        # would add up to sum(buckets) rows of the vocabulary (> 1 GB for 150k-token vocabularies).
        # In the LM head's dtype: a float32 buffer made every step convert the logits, 99 us at
        # batch 256 with a 128k vocabulary on an H200; the sampler widens them itself.
        self.logits = torch.zeros((n, vocab_size), dtype=logits_dtype, device=device)
        # (batch size, longest context it serves) -> graph
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.short_context = SHORT_CONTEXT if max_model_len > SHORT_CONTEXT else None
        self.pool = None

    def _contexts(self, bs: int) -> list[int]:
        if self.short_context is None or bs > SHORT_GRAPH_MAX_BS:
            return [self.max_model_len]
        return [self.max_model_len, self.short_context]

    def _meta(self, bs: int, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            max_query_len=1,
            # The kernels size their grid from this host value; any replay whose contexts are at
            # most this long is valid.
            max_seq_len=max_seq_len,
        )

    def _run(self, bs: int, max_seq_len: int) -> None:
        # The LM head is inside the graph too: its matmul (and the TP all-gather) would
        # otherwise be launched from Python every step.
        with forward_context(self._meta(bs, max_seq_len), self.kv_caches):
            hidden = self.model(self.input_ids[:bs], self.positions[:bs])
        self.logits[:bs].copy_(self.model.compute_logits(hidden))

    @torch.inference_mode()
    def capture(self, also_precompile: Callable[[], object] | None = None) -> None:
        """Capture every graph. ``also_precompile``: the caller's own forwards whose kernels
        compile in the same compile-only pass as the graphs' (never run for real here)."""
        t0 = time.perf_counter()
        shapes = [(bs, ctx) for bs in reversed(self.sizes) for ctx in self._contexts(bs)]
        # The graphs' Triton kernels, compiled side by side before any warm-up runs (ops/launch.py).
        # Batches past PRECOMPILE_MAX_BS (multiples of 16) reach the variants of the largest one;
        # anything missed compiles in its warm-up run, as without this pass.
        some = [(bs, ctx) for bs, ctx in shapes if bs <= PRECOMPILE_MAX_BS or bs == self.max_bs]

        def forwards() -> None:
            for bs, ctx in some:
                self._run(bs, ctx)
            if also_precompile is not None:
                also_precompile()

        precompile("CUDA-graph warm-up", self.logits.device, forwards)
        torch.cuda.empty_cache()
        free0 = torch.cuda.mem_get_info()[0]
        for bs, ctx in shapes:  # largest first, so smaller graphs reuse its pool
            self._run(bs, ctx)  # warm-up: cuBLAS picks kernels (and Triton compiles what is left)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                self._run(bs, ctx)
            if self.pool is None:
                self.pool = g.pool()
            self.graphs[(bs, ctx)] = g
        torch.cuda.synchronize()
        used = (free0 - torch.cuda.mem_get_info()[0]) / 2**30
        short = sum(1 for _, ctx in self.graphs if ctx != self.max_model_len)
        logger.info("CUDA graphs: captured %d decode batch sizes (1..%d)%s in %.2f s, %.2f GiB",
                    len(self.sizes), self.max_bs,
                    f", {short} of them also for contexts up to {self.short_context}" if short else "",
                    time.perf_counter() - t0, used)

    def can_run(self, num_reqs: int, num_tokens: int) -> bool:
        return num_tokens == num_reqs and num_reqs <= self.max_bs

    def run(self, inputs, fill: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Replay the graph of the smallest bucket that holds this decode batch (a StepInputs);
        returns the logits of its rows, in ``logits_dtype``. ``fill`` = (rows, ids): input ids to
        overwrite on the device (tokens sampled by a step still in flight)."""
        b = len(inputs.req_ids)
        bs = next(s for s in self.sizes if s >= b)
        n = self.max_bs
        st = self._staging[self._turn]
        self._turn ^= 1
        # This set must not be rewritten while the copies of two steps ago may still read it.
        if st.copied is not None:
            st.copied.synchronize()
        hp, hs = st.hp, st.hs
        hp[:b] = inputs.input_ids
        hp[n : n + b] = inputs.positions
        hp[2 * n : 2 * n + b] = inputs.slot_mapping
        hs[:b] = inputs.seq_lens
        if st.last_b > b:  # rows this set's last batch used are padding again
            hp[b : st.last_b] = 0
            hp[n + b : n + st.last_b] = 0
            hp[2 * n + b : 2 * n + st.last_b] = -1
            hs[b : st.last_b] = 1
        st.last_b = b
        m = inputs.block_tables.shape[1]
        st.hb[:b, :m] = inputs.block_tables
        self.packed.copy_(st.packed, non_blocking=True)
        self.seq_lens[:bs].copy_(st.seq_lens[:bs], non_blocking=True)
        # Columns past m are stale but never read (seq_lens bound them). Whole rows are one
        # contiguous copy; with long max_model_len only the used columns are worth moving.
        if bs * st.hb.shape[1] * 4 <= _FULL_ROWS_COPY_BYTES:
            self.block_tables[:bs].copy_(st.block_tables[:bs], non_blocking=True)
        else:
            self.block_tables[:bs, :m].copy_(st.block_tables[:bs, :m].contiguous(), non_blocking=True)
        st.copied = torch.cuda.Event()
        st.copied.record()
        if fill is not None:
            self.input_ids.index_copy_(0, *fill)
        # The short-context graph where capture made one (_contexts) and every context fits it.
        short = (bs, self.short_context)
        if short in self.graphs and inputs.seq_lens.max() <= self.short_context:
            self.graphs[short].replay()
        else:
            self.graphs[(bs, self.max_model_len)].replay()
        return self.logits[:b]


class _Staging:
    """Pinned host copies of the static inputs; rows past the batch hold padding values
    (token 0, position 0, slot -1: nothing stored; context of one token)."""

    def __init__(self, n: int, max_blocks: int, pin: bool):
        self.packed = torch.zeros(3 * n, dtype=torch.int64, pin_memory=pin)
        self.packed[2 * n :] = -1
        self.seq_lens = torch.ones(n, dtype=torch.int32, pin_memory=pin)
        self.block_tables = torch.zeros((n, max_blocks), dtype=torch.int32, pin_memory=pin)
        self.hp = self.packed.numpy()
        self.hs = self.seq_lens.numpy()
        self.hb = self.block_tables.numpy()
        self.last_b = 0
        self.copied: torch.cuda.Event | None = None
