"""Triton dequantize-matmul for GGUF block-quantized weights: y = x @ dequant(W).T.

    gguf_matmul(x [M, K] fp32/fp16/bf16, qweight uint8 [N, K / bs * ts] (row stride may exceed
                the row's bytes), qtype) -> y [M, N] in x's dtype, fp32 accumulation.

Design
------
* One program = BLOCK_N weight rows x BLOCK_M input rows; it walks K in BLOCK_K steps. Every
  step dequantizes a [BLOCK_N, BLOCK_K] weight tile in registers straight from the raw GGUF
  bytes (``_dequant_tile``: per value, the byte address of its block, its quant bits and its
  scales) and multiplies it with the matching x tile. The weight never exists in float in
  device memory, and each quantized byte is read from DRAM once per program column (all M rows
  of a program share the tile).
* Decode (M <= 4, the case that matters: memory-bound GEMV): BLOCK_M = next power of two of M
  and a broadcast multiply + row sum on CUDA cores (tl.dot wants >= 16 rows); BLOCK_N is small
  so N / BLOCK_N programs fill the GPU, BLOCK_K large so each program streams long runs of
  each row.
* Larger M (prefill chunks, big decode batches): the same tile dequantization feeding tl.dot
  (tensor cores) with the tile cast to x's dtype (bf16/fp16; fp32 stays fp32). Each weight tile
  is re-dequantized for each BLOCK_M slice of x, which costs ALU, not memory traffic.
* Scales are read per value (same address for a whole block: L1 broadcasts); fp16 scales are
  assembled from two bytes so a row needs no particular alignment.
* The launch depends only on shapes (no host sync, no data-dependent grid): CUDA-graph safe.
* Under TRITON_INTERPRET=1 (CPU tests) tl.dot runs in fp32 (the interpreter's bf16 dot is
  unreliable: numpy has no bf16).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from distllm.ops.gguf_quant import LAYOUTS, GGMLType, ggml_type

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# GGML type ids, as constexpr branches in the kernel.
_Q4_0, _Q4_1, _Q8_0, _Q4_K, _Q6_K = (int(t) for t in (GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0,
                                                      GGMLType.Q4_K, GGMLType.Q6_K))


@triton.jit
def _load_f16(ptr, mask):
    """fp16 stored little-endian at byte addresses ``ptr`` -> fp32."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _load_u8(ptr, mask):
    return tl.load(ptr, mask=mask, other=0).to(tl.int32)


@triton.jit
def _dequant_tile(w_ptr, row, k, mask, QTYPE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr):
    """Weight values at rows ``row`` ([BN, 1] byte offsets) and columns ``k`` ([1, BK]) -> fp32 [BN, BK]."""
    blk = w_ptr + row + (k // BS) * TS  # [BN, BK] address of each value's block
    j = k % BS  # [1, BK] index inside the block
    if QTYPE == 8:  # Q8_0: d | int8 q[32]
        d = _load_f16(blk, mask)
        q = tl.load(blk + 2 + j, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        w = q * d
    elif QTYPE == 2:  # Q4_0: d | 16 bytes (value j: byte j % 16, nibble j // 16)
        d = _load_f16(blk, mask)
        q = (_load_u8(blk + 2 + j % 16, mask) >> ((j // 16) * 4)) & 0xF
        w = d * (q - 8).to(tl.float32)
    elif QTYPE == 3:  # Q4_1: d | m | 16 bytes as Q4_0
        d = _load_f16(blk, mask)
        m = _load_f16(blk + 2, mask)
        q = (_load_u8(blk + 4 + j % 16, mask) >> ((j // 16) * 4)) & 0xF
        w = d * q.to(tl.float32) + m
    elif QTYPE == 12:  # Q4_K: d | dmin | 12 bytes of 6-bit (scale, min) x 8 | 128 bytes of nibbles
        d = _load_f16(blk, mask)
        dmin = _load_f16(blk + 2, mask)
        s = j // 32  # sub-block 0..7
        sl = s % 4
        lo = _load_u8(blk + 4 + sl, mask)  # scale (s < 4) / high scale bits (s >= 4)
        mid = _load_u8(blk + 8 + sl, mask)  # min / high min bits
        hi = _load_u8(blk + 12 + sl, mask)  # low 4 bits of scale and min for s >= 4
        sc = tl.where(s < 4, lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30))
        mn = tl.where(s < 4, mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30))
        q = (_load_u8(blk + 16 + (j // 64) * 32 + j % 32, mask) >> (s % 2 * 4)) & 0xF
        w = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
    else:  # Q6_K: 128 bytes low nibbles | 64 bytes high 2-bit pairs | 16 int8 scales | d
        h = j // 128
        i = (j // 32) % 4
        l = j % 32
        ql = (_load_u8(blk + h * 64 + (i % 2) * 32 + l, mask) >> (i // 2 * 4)) & 0xF
        qh = (_load_u8(blk + 128 + h * 32 + l, mask) >> (i * 2)) & 0x3
        sc = tl.load(blk + 192 + j // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        d = _load_f16(blk + 208, mask)
        w = (d * sc) * ((ql | (qh << 4)) - 32).to(tl.float32)
    return w


@triton.jit
def _gguf_matmul_kernel(
    x_ptr, w_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    QTYPE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row = offs_n[:, None].to(tl.int64) * stride_wn  # [BN, 1] byte offset of each weight row
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BM, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask_k = k < K
        w = _dequant_tile(w_ptr, row, k[None, :], mask_n[:, None] & mask_k[None, :], QTYPE, BS, TS)
        x = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if USE_DOT:
            if DOT_F32:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)  # [BM, BN]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _config(m: int) -> tuple[int, int, int, bool, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, num_warps) for M input rows."""
    if m <= 4:
        return triton.next_power_of_2(m), 16, 256, False, 4
    if m <= 32:
        return 16 if m <= 16 else 32, 64, 64, True, 4
    return 64, 64, 64, True, 4


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: int | str | GGMLType) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(qweight).T; see the module docstring."""
    t = ggml_type(qtype)
    lay = LAYOUTS[t]
    if x.dim() != 2 or qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(f"expected x [M, K] and uint8 qweight [N, bytes], got {tuple(x.shape)}, {qweight.dtype} {tuple(qweight.shape)}")
    m, k = x.shape
    n = qweight.shape[0]
    if k % lay.block_size or qweight.shape[1] != k // lay.block_size * lay.type_size:
        raise ValueError(
            f"{t.name}: x has K={k} but the weight rows hold {qweight.shape[1]} bytes "
            f"({k // lay.block_size * lay.type_size} expected; K must be a multiple of {lay.block_size})."
        )
    if qweight.stride(1) != 1:
        raise ValueError("quantized weight rows must be contiguous bytes (stride 1 along a row).")
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    bm, bn, bk, use_dot, warps = _config(m)
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _gguf_matmul_kernel[grid](
        x, qweight, y, m, n, k, x.stride(0), qweight.stride(0), y.stride(0),
        QTYPE=int(t), BS=lay.block_size, TS=lay.type_size,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=use_dot,
        DOT_F32=_INTERPRET or x.dtype == torch.float32, num_warps=warps,
    )
    return y
