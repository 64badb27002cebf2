"""Vocab-parallel embedding lookup in one Triton launch: out[t] = weight[ids[t] - start] for ids
in [start, end), zeros for the other ranks' ids.

Under tensor parallelism each rank holds a slice of the vocabulary and the ranks' lookups are
summed. In torch that lookup is nine small kernels (two compares, an and, a subtract, zeros,
a where, the gather, a cast and a multiply), each a link of a decode step's chain inside its
CUDA graph; here it is one. Grid: (tokens, column blocks). No host syncs: CUDA-graph safe.
The torch reference is `dispatch.masked_embedding`'s torch path (CPU, and GGUF rows kept quantized).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distllm.ops.launch import launch
from distllm.ops.pdl import launch_options, pdl_wait, use_pdl

BLOCK_D = 1024  # columns per program


@triton.jit
def _masked_lookup_kernel(ids_ptr, w_ptr, out_ptr, start, end, d, stride_w, stride_o,
                          BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)  # the ids may be an earlier kernel's output (ops/pdl.py)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tok = tl.load(ids_ptr + t).to(tl.int64)
    row = tok - start
    mine = (row >= 0) & (tok < end)
    mask = cols < d
    # Another rank's id reads row 0 and stores zeros (a scalar in the load's mask is refused by
    # the interpreter).
    v = tl.load(w_ptr + tl.where(mine, row, 0) * stride_w + cols, mask=mask, other=0.0)  # [BLOCK]
    v = tl.where(mine, v, tl.zeros_like(v))
    tl.store(out_ptr + t * stride_o + cols, v, mask=mask)


def masked_embedding(ids: torch.Tensor, weight: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """ids [...] (int) -> [..., D] in weight's dtype: weight[id - start] where start <= id < end, else 0."""
    d = weight.shape[1]
    out = torch.empty((*ids.shape, d), dtype=weight.dtype, device=weight.device)
    flat = ids.reshape(-1)
    if flat.numel() == 0:
        return out
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    block = min(BLOCK_D, triton.next_power_of_2(d))
    grid = (flat.numel(), triton.cdiv(d, block))
    launch(_masked_lookup_kernel, grid, flat, weight, out, start, end, d, weight.stride(0), d,
           BLOCK=block, num_warps=4 if block >= 1024 else 1, **launch_options(use_pdl(weight)))
    return out
