"""y = x @ W.T (+ bias) for a few rows of x (decode) against a small bf16/fp16 weight, in Triton.

cuBLAS picks tiles for decode shapes of small models that leave most SMs idle: SmolLM2's
960 x 576 qkv projection at batch 1 runs as ~15 programs and takes ~3.8 us on an H200, where a
kernel's floor inside a CUDA graph is ~1.2 us. Here every program takes BLOCK_N weight rows and
one row of x, so the grid covers the SMs, and streams its rows' K in BLOCK_K steps into an
element-wise fp32 accumulator that is reduced once at the end.

Used (``dispatch.linear``) for CUDA tensors with M <= MAX_M rows and a weight of at most
MAX_WEIGHT_ELEMENTS; cuBLAS everywhere else (large weights are bandwidth-bound there already).
``DISTLLM_GEMV=0`` turns it off; ``DISTLLM_GEMV_TILES=oneshot|table`` picks the tile rule. ``benchmarks/bench_gemv.py`` measures it against cuBLAS and
prints the figures CONFIGS and the limits come from.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# On by default with the "oneshot" tiles: on an H200, SmolLM2-135M batch-1 decode went from
# 1069.5 tok/s on cuBLAS to 1387.0 with this kernel (benchmarks/README.md). Its first tiles (the
# "table" rule, chosen with weights hot in L2) had made it slower: 1040 vs 1168 tok/s.
ENABLED = os.environ.get("DISTLLM_GEMV", "1").strip().lower() not in ("0", "false", "no", "off")
MAX_M = int(os.environ.get("DISTLLM_GEMV_MAX_M", "2"))
# Up to SmolLM2's largest decode weight (3072 x 576), where the end-to-end gain was measured;
# larger, bandwidth-bound weights stay on cuBLAS until measured from HBM.
MAX_WEIGHT_ELEMENTS = int(os.environ.get("DISTLLM_GEMV_MAX_ELEMENTS", str(2 << 20)))
# (BLOCK_N, BLOCK_K, num_warps) by weight size: the first row whose limit holds N * K (the
# microbenchmark's best tiles, weights hot in L2).
CONFIGS: list[tuple[int, tuple[int, int, int]]] = [
    (1 << 20, (8, 256, 4)),
    (4 << 20, (8, 256, 4)),
    (1 << 62, (16, 256, 4)),
]
# "oneshot": a program loads its rows' whole K at once (BLOCK_K = K rounded up to a power of two,
# at most 2048), so a cold weight costs one HBM round trip per program instead of one per K step.
TILES = os.environ.get("DISTLLM_GEMV_TILES", "oneshot").strip().lower()
ONESHOT_TILE_ELEMENTS = 4096


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[m, n-tile]: one program = BLOCK_N rows of W x one row m of x."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        mask_k = k < K
        w = tl.load(w_rows + k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)  # [BN, BK]
        x = tl.load(x_row + k, mask=mask_k, other=0.0)  # [BK]
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)  # [BN]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def gemv_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for an [N, K] weight (TILES: "oneshot" or "table")."""
    if TILES == "oneshot":
        block_k = min(2048, triton.next_power_of_2(k))
        return max(1, min(16, ONESHOT_TILE_ELEMENTS // block_k)), block_k, 4
    for limit, cfg in CONFIGS:
        if n * k <= limit:
            return cfg
    return CONFIGS[-1][1]


def applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Is y = x @ weight.T (+ bias) one this kernel should take?"""
    return (
        ENABLED
        and x.dim() == 2
        and 0 < x.shape[0] <= MAX_M
        and weight.dim() == 2
        and x.dtype == weight.dtype
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.shape[0] * weight.shape[1] <= MAX_WEIGHT_ELEMENTS
        and weight.stride(1) == 1
        and x.stride(1) == 1
        and (bias is None or (bias.dim() == 1 and bias.is_contiguous()))
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias [N]) -> [M, N] in x's dtype, fp32 accumulation."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k:
        raise ValueError(f"x has K={k} but the weight is {tuple(weight.shape)}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, warps = config or gemv_config(n, k)
    grid = (triton.cdiv(n, block_n), m)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else y, y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
    )
    return y
