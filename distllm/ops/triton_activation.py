"""Triton SiLU-and-mul for the gated MLP: x = [gate | up] [..., 2d] -> silu(gate) * up [..., d].

One launch instead of torch's silu + mul (+ the strided slices). Semantics follow
`fused_ref.silu_and_mul_ref`: silu(gate) is evaluated in float32 and rounded to x's dtype
(as F.silu does) before the multiply, which is evaluated in float32 and rounded once.
Grid: (rows, column blocks). No host syncs: CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distllm.ops.launch import launch
from distllm.ops.pdl import launch_options, pdl_wait, use_pdl

BLOCK_D = 1024  # output columns per program


@triton.jit
def silu_mul(gate, up, ty: tl.constexpr):
    """silu(gate) * up for float32 gate and up, rounded as silu_and_mul_ref rounds (silu to ty
    first, the product to ty): the one formula this kernel and the gated GEMV share."""
    act = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)
    return (act * up).to(ty)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_xt, stride_ot, BLOCK: tl.constexpr,
        USE_PDL: tl.constexpr = False):
    pdl_wait(USE_PDL)  # see ops/pdl.py
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    x_row = x_ptr + row * stride_xt
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + d + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_ot + cols, silu_mul(gate, up, out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    assert x.shape[-1] == 2 * d, x.shape
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x2 = x.reshape(-1, 2 * d)  # [rows, 2d]; a view for the usual contiguous input
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out2 = out.view(-1, d)  # [rows, d]
    block = min(BLOCK_D, triton.next_power_of_2(d))
    grid = (x2.shape[0], triton.cdiv(d, block))
    num_warps = 4 if block >= 1024 else 1
    launch(_silu_and_mul_kernel, grid, x2, out2, d, x2.stride(0), out2.stride(0), BLOCK=block, num_warps=num_warps,
                               **launch_options(use_pdl(x2)))
    return out
