"""Triton RMSNorm, optionally fused with the residual add: one launch instead of ~8 torch kernels.

    rms_norm(x, weight, eps)                      -> weight * (x / rms(x)).to(x.dtype)
    fused_add_rms_norm(x, residual, weight, eps)  -> (rms_norm(x + residual), x + residual)

Semantics follow `fused_ref.rms_norm_ref` (HF LlamaRMSNorm): the statistics are taken in
float32, the normalized row is rounded to the input dtype *before* the weight multiply, and
the residual sum is rounded to the input dtype (as torch's `x + residual` does) before it is
normalized. Only the order of the float32 sum of squares differs from torch.

x is [..., N] with the last dim contiguous; the leading dims may be strided (Qwen3's q/k norm
runs on [T, H, D] views of the fused qkv output). Each program normalizes ROWS rows of a
[ROWS, BLOCK_N] tile, so a [T*H, 128] head norm does not launch one tiny program per head.
Rows longer than MAX_SINGLE_BLOCK are processed in chunks (two passes over the row).
Outputs are fresh contiguous tensors; no host syncs, so the launch is CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distllm.ops.launch import launch
from distllm.ops.pdl import launch_options, pdl_wait, use_pdl

MAX_SINGLE_BLOCK = 16384  # rows up to this many elements stay in registers (one read of x)
CHUNK_BLOCK = 4096  # chunk width of the two-pass path for longer rows
TILE_ELEMS = 4096  # elements per program when packing several short rows


# Row counts change with every batch size: one compile for all of them (faster start-up).
@triton.jit(do_not_specialize=["n_rows", "n_inner"])
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    n_rows,
    n_inner,
    N,
    eps,
    stride_x0,
    stride_x1,
    stride_r0,
    stride_r1,
    HAS_RESIDUAL: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_CHUNKS: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    cols = tl.arange(0, BLOCK_N)[None, :]  # [1, BLOCK_N]
    if NUM_CHUNKS == 1:
        # The weight is no kernel's output, so it may load before the wait (ops/pdl.py): at
        # batch 1 this HBM read otherwise sits between the row's reduction and the store.
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    pdl_wait(USE_PDL)  # see ops/pdl.py
    # Row r of the flattened [n_rows, N] view is (outer, inner) = divmod(r, n_inner) of the
    # [outer, inner, N] input; outputs are contiguous, so their row offset is r * N.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    outer = rows64 // n_inner
    inner = rows64 % n_inner
    x_row = x_ptr + (outer * stride_x0 + inner * stride_x1)[:, None]  # [ROWS, 1]
    r_row = res_ptr + (outer * stride_r0 + inner * stride_r1)[:, None]
    o_off = (rows64 * N)[:, None]
    in_dtype = x_ptr.dtype.element_ty

    if NUM_CHUNKS == 1:
        mask = row_ok[:, None] & (cols < N)
        x = tl.load(x_row + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(r_row + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(in_dtype)  # rounded like torch's x + residual
            tl.store(res_out_ptr + o_off + cols, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / N + eps)  # [ROWS]
        y = (xf * rstd[:, None]).to(in_dtype).to(tl.float32)  # HF: cast before the weight
        tl.store(out_ptr + o_off + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: sum of squares (and the residual sum, written out and re-read in pass 2).
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            cc = c * BLOCK_N + cols
            mask = row_ok[:, None] & (cc < N)
            x = tl.load(x_row + cc, mask=mask, other=0.0)
            if HAS_RESIDUAL:
                r = tl.load(r_row + cc, mask=mask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(in_dtype)
                tl.store(res_out_ptr + o_off + cc, x, mask=mask)
            xf = x.to(tl.float32)
            acc += xf * xf
        rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / N + eps)
        # Pass 2: normalize and scale.
        for c in range(NUM_CHUNKS):
            cc = c * BLOCK_N + cols
            mask = row_ok[:, None] & (cc < N)
            if HAS_RESIDUAL:
                x = tl.load(res_out_ptr + o_off + cc, mask=mask, other=0.0)
            else:
                x = tl.load(x_row + cc, mask=mask, other=0.0)
            y = (x.to(tl.float32) * rstd[:, None]).to(in_dtype).to(tl.float32)
            w = tl.load(w_ptr + cc, mask=cc < N, other=0.0).to(tl.float32)
            tl.store(out_ptr + o_off + cc, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """View t [..., N] as [outer, inner, N] with a contiguous last dim (copies only if it must)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t.view(1, 1, -1)
    if t.dim() == 2:
        return t.unsqueeze(1)  # [T, 1, N]
    if t.dim() > 3:
        t = t.reshape(-1, t.shape[-2], t.shape[-1])  # [prod(leading), inner, N]
    return t


def _launch_config(n: int, n_rows: int, block_n: int | None) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK_N, NUM_CHUNKS, num_warps) for rows of n elements."""
    if block_n is None:
        full = triton.next_power_of_2(n)
        block_n = full if full <= MAX_SINGLE_BLOCK else CHUNK_BLOCK
    num_chunks = triton.cdiv(n, block_n)
    rows = 1
    if num_chunks == 1:
        rows = max(1, min(TILE_ELEMS // block_n, triton.next_power_of_2(n_rows)))
    num_warps = max(1, min(16, rows * block_n // 512))
    return rows, block_n, num_chunks, num_warps


def _rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, block_n: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    assert weight.shape == (n,), (weight.shape, x.shape)
    if weight.stride(0) != 1:
        weight = weight.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype, (residual.shape, residual.dtype, x.dtype)
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out, res_out
    x3 = _as_3d(x)
    r3 = _as_3d(residual) if residual is not None else x3
    n_rows = x3.shape[0] * x3.shape[1]
    rows, block, chunks, warps = _launch_config(n, n_rows, block_n)
    launch(_rms_norm_kernel, (triton.cdiv(n_rows, rows),),
        x3,
        r3,
        weight,
        out,
        res_out if res_out is not None else out,
        n_rows,
        x3.shape[1],
        n,
        eps,
        x3.stride(0),
        x3.stride(1),
        r3.stride(0),
        r3.stride(1),
        HAS_RESIDUAL=residual is not None,
        ROWS=rows,
        BLOCK_N=block,
        NUM_CHUNKS=chunks,
        num_warps=warps,
        **launch_options(use_pdl(x)),
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, block_n: int | None = None) -> torch.Tensor:
    """x [..., N] -> [..., N] (contiguous). block_n overrides the tile width (tests use it to
    force the chunked path on short rows)."""
    return _rms_norm(x, None, weight, eps, block_n)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, block_n: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (rms_norm(x + residual), x + residual), both fresh contiguous tensors."""
    out, res_out = _rms_norm(x, residual, weight, eps, block_n)
    assert res_out is not None
    return out, res_out
