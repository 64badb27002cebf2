"""Triton kernels for GGUF block-quantized weights: y = x @ dequant(W).T.

    gguf_matmul(x [M, K] fp32/fp16/bf16, qweight uint8 [N, K / bs * ts] (row stride may exceed
                the row's bytes), qtype) -> y [M, N] in x's dtype, fp32 accumulation.

Design
------
* Decode (small M, the case that matters: memory-bound GEMV) runs ``_gemv_kernel``:
  grid (N / BLOCK_N, M), one program = BLOCK_N weight rows x one x row, walking K a few
  "units" at a time. A unit is a run of quant bytes with one layout: a Q8_0/Q4_0/Q4_1 block,
  or 64 values of a K-quant block (Q4_K: 32 nibble bytes with two 6-bit sub-scales; Q6_K: 32
  low-nibble bytes + the 32 bytes of high bits). Tiles are [BLOCK_N, units, bytes]: each quant
  byte is loaded once and gives its low and high nibble, scales are loaded once per unit, and
  the block scale is factored out of the sum (y += d * sum(x q) + m * sum(x)), so the inner
  loop is one multiply-add per value. Rows of x > 1 re-read the weight tile from L2, not DRAM.
* Mid M: ``_mma_kernel`` (tensor cores) decodes the same units into two [BLOCK_N, U * UB]
  halves and multiplies each with the x columns it belongs to (a dot product may take K in
  any order, so nibbles need no interleaving). Correct on an H200 but slower there than the
  dequantize path, so off by default (MMA_MAX_M).
* Large M (prefill, big batches): ``gguf_dequantize`` writes dequant(W) in x's dtype
  (``_dequant_kernel``, the same unit decode) and cuBLAS does the matmul. The transient
  weight costs N * K * 2 bytes of scratch per call; the matmul dominates at that size.
* Which path runs for which M (and the GEMV tile per type) comes from
  ``benchmarks/bench_gguf_quant.py --sweep`` on an H200: see GEMV_MAX_M, MMA_MAX_M, GEMV_CONFIG.
* The launch depends only on shapes (no host sync, no data-dependent grid): CUDA-graph safe.
* fp16 scales are assembled from two bytes, so rows need no particular alignment.

Word GEMV (default for M <= GEMV_MAX_M)
---------------------------------------
``_gemv_kernel`` loads one byte per quant byte (a row stride like 360 bytes gives Triton no
alignment to vectorize with) and reduces across threads every K step. ``_gemv_words_kernel``
reads the same rows through a zero-copy ``qweight.view(int32 / int16)`` (row stride passed in
words), so every load moves a whole word:

* Q4_1 (20 B = 5 int32): word 0 = d | m << 16; words 1..4: byte j of word i = values 4i + j (low
  nibble) and 16 + 4i + j (high).  Q4_K (144 B = 36 int32): word 0 = d | dmin << 16, words 1..3
  the 12 scale bytes, words 4 + 8g + i: byte j = values 64g + 4i + j and + 32.
* Q8_0 (34 B = 17 int16): halfword 0 = d, halfword 1 + i = int8 values 2i, 2i + 1.
  Q4_0 (18 B = 9 int16): halfword 0 = d, 1 + i: byte j = values 2i + j and 16 + 2i + j.
  Q6_K (210 B = 105 int16): a unit is half a block (128 values): 16 halfwords of each of the two
  low-nibble runs, 16 of high bits, 4 scale halfwords, d.
* Tiles are [BLOCK_N rows, UNITS units, quant words per unit]; a static loop over the bytes of
  a word shifts/masks them into values (a thread unpacks the words it loaded: no layout
  conversion) and loads the matching [1, UNITS, words] x values (shared by the rows a thread
  holds); each value's scale/min is folded in element-wise, acc += (d q + m) x, into a per-word
  fp32 tile over the whole K loop, reduced once at the end.
* Tiles come from ``gemv_words_config`` (GEMV_WORDS_CONFIG: measured per (type, N, K, M), else a
  heuristic: whole short rows in one step, small BLOCK_N so small matrices still give >= 2
  programs per SM). The word view needs the row bytes, the row stride and the data pointer to be
  multiples of the word size; otherwise the byte kernel runs.
* ``DISTLLM_GGUF_GEMV=words|bytes`` (read at import into GEMV_KERNEL, default ``words``) picks
  the word kernel or the byte kernel (``_gemv_kernel``) for GEMV-sized M.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from distllm.ops.gguf_quant import LAYOUTS, GGMLType, ggml_type
from distllm.ops.launch import launch
from distllm.ops.pdl import launch_options, pdl_wait, use_pdl


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # its bf16 tl.dot is unreliable: fp32 there
# The kernels branch on the GGML type id (a constexpr): Q4_0 = 2, Q4_1 = 3, Q8_0 = 8, Q4_K = 12, Q6_K = 14.


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
def _gemv_kernel(
    x_ptr, w_ptr, y_ptr,
    N, K,
    stride_xm, stride_wn, stride_ym,
    QTYPE: tl.constexpr, TS: tl.constexpr,
    BLOCK_N: tl.constexpr, UNITS: tl.constexpr, UB: tl.constexpr, UV: tl.constexpr,
):
    """y[m, n-tile] for one x row m: a unit is UB quant bytes holding UV values (module docstring)."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row = (offs_n.to(tl.int64) * stride_wn)[:, None, None]  # [BN, 1, 1] byte offset of each row
    mask_n = (offs_n < N)[:, None, None]
    l = tl.arange(0, UB)[None, None, :]  # [1, 1, UB] byte inside a unit
    x_row = x_ptr + m * stride_xm
    n_units = K // UV
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for u0 in range(0, n_units, UNITS):
        u = (u0 + tl.arange(0, UNITS))[None, :, None]  # [1, U, 1] unit index along the row
        mask_u = u < n_units
        mask = mask_n & mask_u
        if QTYPE == 8:  # Q8_0: unit = block; y += d * sum(x q)
            base = w_ptr + row + u * TS
            d = _load_f16(base, mask)  # [BN, U, 1]
            q = tl.load(base + 2 + l, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            x = tl.load(x_row + u * 32 + l, mask=mask_u, other=0.0).to(tl.float32)  # [1, U, UB]
            part = d * tl.sum(q * x, axis=2, keep_dims=True)
        elif QTYPE == 2 or QTYPE == 3:  # Q4_0 / Q4_1: unit = block, low nibbles = values 0..15
            base = w_ptr + row + u * TS
            d = _load_f16(base, mask)
            if QTYPE == 2:
                qb = _load_u8(base + 2 + l, mask)  # [BN, U, 16]
            else:
                qb = _load_u8(base + 4 + l, mask)
            x_lo = tl.load(x_row + u * 32 + l, mask=mask_u, other=0.0).to(tl.float32)
            x_hi = tl.load(x_row + u * 32 + 16 + l, mask=mask_u, other=0.0).to(tl.float32)
            dot = tl.sum((qb & 0xF).to(tl.float32) * x_lo + (qb >> 4).to(tl.float32) * x_hi, axis=2, keep_dims=True)
            sx = tl.sum(x_lo + x_hi, axis=2, keep_dims=True)  # [1, U, 1]
            if QTYPE == 2:  # w = d (q - 8)
                part = d * (dot - 8.0 * sx)
            else:  # w = d q + m
                part = d * dot + _load_f16(base + 2, mask) * sx
        elif QTYPE == 12:  # Q4_K: unit = 64 values g of a block: 32 bytes, sub-blocks 2g (low) and 2g + 1
            g = u % 4
            blk = w_ptr + row + (u // 4) * TS
            d = _load_f16(blk, mask)
            dmin = _load_f16(blk + 2, mask)
            sc_lo, mn_lo = _q4k_scale_min(blk, 2 * g, mask)
            sc_hi, mn_hi = _q4k_scale_min(blk, 2 * g + 1, mask)
            qb = _load_u8(blk + 16 + g * 32 + l, mask)  # [BN, U, 32]
            k_lo = (u // 4) * 256 + g * 64 + l
            x_lo = tl.load(x_row + k_lo, mask=mask_u, other=0.0).to(tl.float32)
            x_hi = tl.load(x_row + k_lo + 32, mask=mask_u, other=0.0).to(tl.float32)
            dot_lo = tl.sum((qb & 0xF).to(tl.float32) * x_lo, axis=2, keep_dims=True)
            dot_hi = tl.sum((qb >> 4).to(tl.float32) * x_hi, axis=2, keep_dims=True)
            sx_lo = tl.sum(x_lo, axis=2, keep_dims=True)
            sx_hi = tl.sum(x_hi, axis=2, keep_dims=True)
            part = d * (sc_lo * dot_lo + sc_hi * dot_hi) - dmin * (mn_lo * sx_lo + mn_hi * sx_hi)
        else:  # Q6_K: unit c = (half h, i2) of a block: 32 low-nibble bytes for values 32 i2 + l and 32 (i2 + 2) + l of the half
            c = u % 4
            h = c // 2
            i2 = c % 2
            blk = w_ptr + row + (u // 4) * TS
            qlb = _load_u8(blk + h * 64 + i2 * 32 + l, mask)  # [BN, U, 32]
            qhb = _load_u8(blk + 128 + h * 32 + l, mask)
            q_lo = ((qlb & 0xF) | (((qhb >> (2 * i2)) & 3) << 4)) - 32
            q_hi = ((qlb >> 4) | (((qhb >> (2 * i2 + 4)) & 3) << 4)) - 32
            v_lo = h * 128 + i2 * 32 + l  # value index inside the block
            sc_lo = tl.load(blk + 192 + v_lo // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            sc_hi = tl.load(blk + 192 + (v_lo + 64) // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
            k_lo = (u // 4) * 256 + v_lo
            x_lo = tl.load(x_row + k_lo, mask=mask_u, other=0.0).to(tl.float32)
            x_hi = tl.load(x_row + k_lo + 64, mask=mask_u, other=0.0).to(tl.float32)
            d = _load_f16(blk + 208, mask)
            part = d * tl.sum(sc_lo * q_lo.to(tl.float32) * x_lo + sc_hi * q_hi.to(tl.float32) * x_hi, axis=2, keep_dims=True)
        acc += tl.sum(tl.sum(part, axis=2), axis=1)
    tl.store(y_ptr + m * stride_ym + offs_n, acc.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _f16_lo(w):
    """fp16 in the low 16 bits of int32 words -> fp32."""
    return (w & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _f16_hi(w):
    """fp16 in the high 16 bits of int32 words -> fp32."""
    return ((w >> 16) & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _q4k_scale_min_words(w1, w2, w3, s):
    """6-bit (scale, min) of sub-block s (0..7) from the Q4_K scale words 1..3 (bytes 4..15 of
    the block: byte sl of word 1/2/3 = scale byte sl/4 + sl/8 + sl) -> fp32."""
    sh = 8 * (s % 4)
    lo = (w1 >> sh) & 0xFF
    mid = (w2 >> sh) & 0xFF
    hi = (w3 >> sh) & 0xFF
    sc = tl.where(s < 4, lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30))
    mn = tl.where(s < 4, mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _i8_of(w, sel):
    """Signed byte ``sel`` (0 or 1) of sign-extended int16 words (int32 tensors) -> int32."""
    return (w << (24 - 8 * sel)) >> 24


@triton.jit
def _nibble_pairs(acc, w, a_lo, b_lo, a_hi, b_hi, x_row, kx, mask_u, HI: tl.constexpr, E: tl.constexpr):
    """acc + the 4-bit values of words w: byte j's low nibble is value kx + j (a_lo q + b_lo),
    its high nibble value kx + HI + j (a_hi q + b_hi); Q4_0/Q4_1 (HI 16) and Q4_K (HI 32)."""
    for j in tl.static_range(E):
        x_lo = tl.load(x_row + kx + j, mask=mask_u, other=0.0).to(tl.float32)
        x_hi = tl.load(x_row + kx + (HI + j), mask=mask_u, other=0.0).to(tl.float32)
        lo = ((w >> (8 * j)) & 0xF).to(tl.float32)
        hi = ((w >> (8 * j + 4)) & 0xF).to(tl.float32)
        acc += (a_lo * lo + b_lo) * x_lo + (a_hi * hi + b_hi) * x_hi
    return acc


@triton.jit
def _gemv_words_kernel(
    x_ptr, w_ptr, y_ptr,
    N, K,
    stride_xm, stride_wn, stride_ym,
    QTYPE: tl.constexpr, TW: tl.constexpr, QW: tl.constexpr, E: tl.constexpr, UV: tl.constexpr,
    BLOCK_N: tl.constexpr, UNITS: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """y[m, n-tile] for one x row m, weights read as words (int32 or int16: ``w_ptr``'s type).
    A block is TW words; a unit (UV values) has QW quant words of E bytes each. Tiles are
    [BLOCK_N, UNITS, QW] words; the E bytes of each word are unpacked by a static loop (so a
    thread keeps the bytes of the words it loaded), and acc holds one running sum per word
    position over the whole K loop, reduced once at the end."""
    pdl_wait(USE_PDL)  # see ops/pdl.py
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = (offs_n < N)[:, None, None]
    rows = w_ptr + (offs_n.to(tl.int64) * stride_wn)[:, None, None]  # [BN, 1, 1] row starts
    wi = tl.arange(0, QW)[None, None, :]  # [1, 1, QW] quant word inside a unit
    x_row = x_ptr + m * stride_xm
    n_units = K // UV
    acc = tl.zeros([BLOCK_N, UNITS, QW], dtype=tl.float32)
    for u0 in range(0, n_units, UNITS):
        u = (u0 + tl.arange(0, UNITS))[None, :, None]  # [1, U, 1]
        mask_u = u < n_units
        mask = mask_n & mask_u
        if QTYPE == 8:  # Q8_0, int16: d | 16 halfwords of two int8 values (2 wi + j)
            blk = rows + u * TW
            d = tl.load(blk, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)  # [BN, U, 1]
            w = tl.load(blk + 1 + wi, mask=mask, other=0).to(tl.int32)  # [BN, U, QW], sign-extended
            kx = u * 32 + 2 * wi
            for j in tl.static_range(E):
                x = tl.load(x_row + kx + j, mask=mask_u, other=0.0).to(tl.float32)  # [1, U, QW]
                acc += (d * _i8_of(w, j).to(tl.float32)) * x
        elif QTYPE == 2 or QTYPE == 3:  # Q4_0 (int16) / Q4_1 (int32): byte j of quant word wi = values E wi + j, + 16
            blk = rows + u * TW
            if QTYPE == 2:  # d | 8 halfwords; w = d (q - 8)
                d = tl.load(blk, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
                mn = -8.0 * d
                w = tl.load(blk + 1 + wi, mask=mask, other=0).to(tl.int32)
            else:  # d | m << 16, 4 words; w = d q + m
                dw = tl.load(blk, mask=mask, other=0)
                d = _f16_lo(dw)
                mn = _f16_hi(dw)
                w = tl.load(blk + 1 + wi, mask=mask, other=0)
            acc = _nibble_pairs(acc, w, d, mn, d, mn, x_row, u * 32 + E * wi, mask_u, 16, E)
        elif QTYPE == 12:  # Q4_K, int32: unit = 64 values g of block b: words 4 + 8 g + wi
            blk = rows + (u // 4) * TW
            g = u % 4
            dw = tl.load(blk, mask=mask, other=0)
            d = _f16_lo(dw)
            dmin = _f16_hi(dw)
            w1 = tl.load(blk + 1, mask=mask, other=0)
            w2 = tl.load(blk + 2, mask=mask, other=0)
            w3 = tl.load(blk + 3, mask=mask, other=0)
            sc_lo, mn_lo = _q4k_scale_min_words(w1, w2, w3, 2 * g)
            sc_hi, mn_hi = _q4k_scale_min_words(w1, w2, w3, 2 * g + 1)
            a_lo = d * sc_lo
            b_lo = -dmin * mn_lo
            a_hi = d * sc_hi
            b_hi = -dmin * mn_hi
            w = tl.load(blk + 4 + g * 8 + wi, mask=mask, other=0)
            acc = _nibble_pairs(acc, w, a_lo, b_lo, a_hi, b_hi, x_row, (u // 4) * 256 + g * 64 + 4 * wi, mask_u, 32, E)
        else:  # Q6_K, int16: unit = half h of block b, values 128 h + 32 i + 2 wi + j for i = 0..3
            blk = rows + (u // 2) * TW
            h = u % 2
            qa = tl.load(blk + h * 32 + wi, mask=mask, other=0).to(tl.int32)  # ql bytes 64 h + 2 wi + j
            qb = tl.load(blk + h * 32 + 16 + wi, mask=mask, other=0).to(tl.int32)  # ql bytes 64 h + 32 + 2 wi + j
            qh = tl.load(blk + 64 + h * 16 + wi, mask=mask, other=0).to(tl.int32)  # qh bytes 32 h + 2 wi + j
            d = tl.load(blk + 104, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)
            sel = wi // 8  # scale of value 128 h + 32 i + l: byte l // 16 of halfword 96 + 4 h + i
            kx = (u // 2) * 256 + h * 128 + 2 * wi
            for i in tl.static_range(4):
                sw = tl.load(blk + 96 + h * 4 + i, mask=mask, other=0).to(tl.int32)  # [BN, U, 1]
                ds = d * _i8_of(sw, sel).to(tl.float32)  # [BN, U, QW]
                for j in tl.static_range(E):
                    if i % 2 == 0:
                        low = (qa >> (8 * j + 4 * (i // 2))) & 0xF
                    else:
                        low = (qb >> (8 * j + 4 * (i // 2))) & 0xF
                    q = (low | (((qh >> (8 * j + 2 * i)) & 3) << 4)) - 32
                    x = tl.load(x_row + kx + (32 * i + j), mask=mask_u, other=0.0).to(tl.float32)
                    acc += (ds * q.to(tl.float32)) * x
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(y_ptr + m * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _unit_tile(w_ptr, row, u, l, mask, QTYPE: tl.constexpr, TS: tl.constexpr):
    """Weights of units ``u`` ([1, U, 1]) in rows ``row`` ([BN, 1, 1]), as two fp32 halves
    [BN, U, UB] with the value indices they multiply ([1, U, UB] each): (w_lo, k_lo, w_hi, k_hi).
    Q8_0 halves are the block's first and last 16 values; 4-bit types: low and high nibbles."""
    if QTYPE == 8:  # UB = 16
        base = w_ptr + row + u * TS
        d = _load_f16(base, mask)
        q_lo = tl.load(base + 2 + l, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        q_hi = tl.load(base + 18 + l, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        k_lo = u * 32 + l
        w_lo = q_lo * d
        w_hi = q_hi * d
        k_hi = k_lo + 16
    elif QTYPE == 2 or QTYPE == 3:  # UB = 16
        base = w_ptr + row + u * TS
        d = _load_f16(base, mask)
        k_lo = u * 32 + l
        k_hi = k_lo + 16
        if QTYPE == 2:
            qb = _load_u8(base + 2 + l, mask)
            w_lo = d * ((qb & 0xF) - 8).to(tl.float32)
            w_hi = d * ((qb >> 4) - 8).to(tl.float32)
        else:
            qb = _load_u8(base + 4 + l, mask)
            m = _load_f16(base + 2, mask)
            w_lo = d * (qb & 0xF).to(tl.float32) + m
            w_hi = d * (qb >> 4).to(tl.float32) + m
    elif QTYPE == 12:  # UB = 32
        g = u % 4
        blk = w_ptr + row + (u // 4) * TS
        d = _load_f16(blk, mask)
        dmin = _load_f16(blk + 2, mask)
        sc_lo, mn_lo = _q4k_scale_min(blk, 2 * g, mask)
        sc_hi, mn_hi = _q4k_scale_min(blk, 2 * g + 1, mask)
        qb = _load_u8(blk + 16 + g * 32 + l, mask)
        w_lo = (d * sc_lo) * (qb & 0xF).to(tl.float32) - dmin * mn_lo
        w_hi = (d * sc_hi) * (qb >> 4).to(tl.float32) - dmin * mn_hi
        k_lo = (u // 4) * 256 + g * 64 + l
        k_hi = k_lo + 32
    else:  # Q6_K, UB = 32
        c = u % 4
        h = c // 2
        i2 = c % 2
        blk = w_ptr + row + (u // 4) * TS
        qlb = _load_u8(blk + h * 64 + i2 * 32 + l, mask)
        qhb = _load_u8(blk + 128 + h * 32 + l, mask)
        q_lo = ((qlb & 0xF) | (((qhb >> (2 * i2)) & 3) << 4)) - 32
        q_hi = ((qlb >> 4) | (((qhb >> (2 * i2 + 4)) & 3) << 4)) - 32
        v_lo = h * 128 + i2 * 32 + l
        sc_lo = tl.load(blk + 192 + v_lo // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        sc_hi = tl.load(blk + 192 + (v_lo + 64) // 16, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        d = _load_f16(blk + 208, mask)
        w_lo = (d * sc_lo) * q_lo.to(tl.float32)
        w_hi = (d * sc_hi) * q_hi.to(tl.float32)
        k_lo = (u // 4) * 256 + v_lo
        k_hi = k_lo + 64
    return w_lo, k_lo, w_hi, k_hi


@triton.jit(do_not_specialize=["M"])  # M (tokens) changes every step: one compile for all
def _mma_kernel(
    x_ptr, w_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_ym,
    QTYPE: tl.constexpr, TS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNITS: tl.constexpr, UB: tl.constexpr, UV: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """y tile [BLOCK_M, BLOCK_N] with tensor cores: each step decodes UNITS units of BLOCK_N rows
    into two [BLOCK_N, UNITS * UB] halves and multiplies each with the x columns it belongs to
    (the order of K inside a dot product is free, so no interleaving is needed)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row = (offs_n.to(tl.int64) * stride_wn)[:, None, None]
    mask_n = (offs_n < N)[:, None, None]
    mask_m = (offs_m < M)[:, None]
    l = tl.arange(0, UB)[None, None, :]
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [BM, 1]
    n_units = K // UV
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for u0 in range(0, n_units, UNITS):
        u = (u0 + tl.arange(0, UNITS))[None, :, None]
        mask_u = u < n_units
        w_lo, k_lo, w_hi, k_hi = _unit_tile(w_ptr, row, u, l, mask_n & mask_u, QTYPE, TS)
        k_lo = tl.reshape(k_lo, (1, UNITS * UB))  # [1, U * UB]
        k_hi = tl.reshape(k_hi, (1, UNITS * UB))
        x_lo = tl.load(x_rows + k_lo, mask=mask_m & (k_lo < K), other=0.0)  # [BM, U * UB]
        x_hi = tl.load(x_rows + k_hi, mask=mask_m & (k_hi < K), other=0.0)
        w_lo = tl.reshape(w_lo, (BLOCK_N, UNITS * UB))
        w_hi = tl.reshape(w_hi, (BLOCK_N, UNITS * UB))
        if DOT_F32:
            acc += tl.dot(x_lo.to(tl.float32), tl.trans(w_lo), input_precision="ieee")
            acc += tl.dot(x_hi.to(tl.float32), tl.trans(w_hi), input_precision="ieee")
        else:
            acc += tl.dot(x_lo, tl.trans(w_lo.to(x_lo.dtype)))
            acc += tl.dot(x_hi, tl.trans(w_hi.to(x_hi.dtype)))
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m & (offs_n < N)[None, :])


@triton.jit
def _q4k_scale_min(blk, s, mask):
    """6-bit (scale, min) of sub-block s (0..7) of Q4_K blocks at ``blk`` -> fp32."""
    sl = s % 4
    lo = _load_u8(blk + 4 + sl, mask)
    mid = _load_u8(blk + 8 + sl, mask)
    hi = _load_u8(blk + 12 + sl, mask)
    sc = tl.where(s < 4, lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30))
    mn = tl.where(s < 4, mid & 0x3F, (hi >> 4) | ((mid >> 2) & 0x30))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _dequant_kernel(
    w_ptr, out_ptr, N, K, stride_wn, stride_on,
    QTYPE: tl.constexpr, TS: tl.constexpr,
    BLOCK_N: tl.constexpr, UNITS: tl.constexpr, UB: tl.constexpr, UV: tl.constexpr,
):
    """out [N, K] (its dtype) = dequant(W): one [BLOCK_N rows, UNITS units] tile per program,
    decoded like the matmul kernels (each byte and scale loaded once)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = (offs_n.to(tl.int64) * stride_wn)[:, None, None]
    u = (tl.program_id(1) * UNITS + tl.arange(0, UNITS))[None, :, None]
    l = tl.arange(0, UB)[None, None, :]
    mask = (offs_n < N)[:, None, None] & (u < K // UV)
    w_lo, k_lo, w_hi, k_hi = _unit_tile(w_ptr, row, u, l, mask, QTYPE, TS)
    out = out_ptr + (offs_n.to(tl.int64) * stride_on)[:, None, None]
    tl.store(out + k_lo, w_lo.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + k_hi, w_hi.to(out_ptr.dtype.element_ty), mask=mask)


# Unit geometry per type: (quant bytes per unit UB, values per unit UV, units per K step).
_UNITS = {
    GGMLType.Q8_0: (32, 32, 8),
    GGMLType.Q4_0: (16, 32, 16),
    GGMLType.Q4_1: (16, 32, 16),
    GGMLType.Q4_K: (32, 64, 8),
    GGMLType.Q6_K: (32, 64, 8),
}
# Path by M (rows of x), from timings on an H200 (N = K = 4096, bf16 x; 2026-11-27): GEMV for
# M <= GEMV_MAX_M[type], the tensor-core kernel up to MMA_MAX_M[type], dequantize + cuBLAS above.
# There the dequantize path (~21-31 us + the matmul) beat the tensor-core kernel (~95-125 us at
# M = 8..16) for every type, so the latter is off; GEMV cost grows ~13-17 us a row past M = 1.
# Ints work too (tests and the benchmark's sweep set them).
GEMV_MAX_M = {GGMLType.Q4_0: 4, GGMLType.Q4_1: 3, GGMLType.Q8_0: 2, GGMLType.Q4_K: 4, GGMLType.Q6_K: 4}
MMA_MAX_M = {GGMLType.Q4_0: 0, GGMLType.Q4_1: 0, GGMLType.Q8_0: 0, GGMLType.Q4_K: 0, GGMLType.Q6_K: 0}
MMA_BLOCK = (64, 64, 64)  # (BLOCK_M, BLOCK_N, values of each half per step)
# GEMV (BLOCK_N, num_warps) per type, fastest at M = 1 in the same sweep.
GEMV_CONFIG = {GGMLType.Q4_0: (8, 2), GGMLType.Q4_1: (16, 8), GGMLType.Q8_0: (16, 4), GGMLType.Q4_K: (4, 2),
               GGMLType.Q6_K: (8, 4)}
DEQUANT_TILE = (16, 8)  # (rows, units) of a dequantization tile


# GEMV_CONFIG's tiles were tuned on 4096-wide matrices. A small model's matrices (SmolLM2:
# N = 576) get a few dozen programs on 132 SMs; DISTLLM_GGUF_GEMV_MIN_WAVES=w halves the tile
# (with its warps) until the grid covers the SMs w times. Off (0) by default: its A/B run on an
# H100 was cut short, so whether it pays is not measured yet.
GEMV_MIN_WAVES = float(os.environ.get("DISTLLM_GGUF_GEMV_MIN_WAVES", "0"))


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


_SM_COUNTS: dict[int, int] = {}


def gemv_tile(t: GGMLType, n: int, m: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_N, num_warps) of the GEMV for an [m, n] output on device (see GEMV_MIN_WAVES)."""
    block_n, warps = GEMV_CONFIG[t]
    if GEMV_MIN_WAVES <= 0 or device.type != "cuda":
        return block_n, warps
    target = GEMV_MIN_WAVES * _sm_count(device)
    while block_n > 1 and triton.cdiv(n, block_n) * m < target:
        block_n //= 2
        warps = max(1, warps // 2)
    return block_n, warps


def _check(x: torch.Tensor, qweight: torch.Tensor, t: GGMLType) -> None:
    lay = LAYOUTS[t]
    if x.dim() != 2 or qweight.dim() != 2 or qweight.dtype != torch.uint8:
        raise ValueError(
            f"expected x [M, K] and uint8 qweight [N, bytes], got {tuple(x.shape)}, {qweight.dtype} {tuple(qweight.shape)}"
        )
    k = x.shape[1]
    if k % lay.block_size or qweight.shape[1] != k // lay.block_size * lay.type_size:
        raise ValueError(
            f"{t.name}: x has K={k} but the weight rows hold {qweight.shape[1]} bytes "
            f"({k // lay.block_size * lay.type_size} expected; K must be a multiple of {lay.block_size})."
        )
    if qweight.stride(1) != 1:
        raise ValueError("quantized weight rows must be contiguous bytes (stride 1 along a row).")


def gguf_dequantize(qweight: torch.Tensor, qtype: int | str | GGMLType, k: int, dtype: torch.dtype) -> torch.Tensor:
    """dequant(W) [N, K] in ``dtype`` (Triton; same values as ``dequantize_ref`` rounded to dtype)."""
    t = ggml_type(qtype)
    lay = LAYOUTS[t]
    n = qweight.shape[0]
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    ub, uv = _half_unit(t)
    bn, units = DEQUANT_TILE
    grid = (triton.cdiv(n, bn), triton.cdiv(k // uv, units))
    launch(_dequant_kernel, grid,
        qweight, out, n, k, qweight.stride(0), out.stride(0),
        QTYPE=int(t), TS=lay.type_size, BLOCK_N=bn, UNITS=units, UB=ub, UV=uv, num_warps=4,
    )
    return out


def _half_unit(t: GGMLType) -> tuple[int, int]:
    """(values in each half, values per unit) as ``_unit_tile`` decodes a unit."""
    ub, uv, _ = _UNITS[t]
    return (16 if t == GGMLType.Q8_0 else ub), uv  # Q8_0: a 32-byte unit splits into two 16-value halves


def gguf_matmul(x: torch.Tensor, qweight: torch.Tensor, qtype: int | str | GGMLType) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(qweight).T; see the module docstring."""
    t = ggml_type(qtype)
    _check(x, qweight, t)
    m, k = x.shape
    n = qweight.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    gemv_max = GEMV_MAX_M[t] if isinstance(GEMV_MAX_M, dict) else GEMV_MAX_M
    mma_max = MMA_MAX_M[t] if isinstance(MMA_MAX_M, dict) else MMA_MAX_M
    if m > max(gemv_max, mma_max):
        return x @ gguf_dequantize(qweight, t, k, x.dtype).T
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if m > gemv_max:
        ub, uv = _half_unit(t)
        bm, bn, half = MMA_BLOCK
        grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
        launch(_mma_kernel, grid,
            x, qweight, y, m, n, k, x.stride(0), qweight.stride(0), y.stride(0),
            QTYPE=int(t), TS=LAYOUTS[t].type_size, BLOCK_M=bm, BLOCK_N=bn, UNITS=max(1, half // ub), UB=ub, UV=uv,
            DOT_F32=x.dtype == torch.float32 or _INTERPRET, num_warps=4,
        )
        return y
    gguf_gemv(x, qweight, t, y)
    return y


# ----------------------------------------------------------------------------- word GEMV

# DISTLLM_GGUF_GEMV=words|bytes: the GEMV kernel for M <= GEMV_MAX_M (module docstring).
GEMV_KERNEL = os.environ.get("DISTLLM_GGUF_GEMV", "words").strip().lower()
if GEMV_KERNEL not in ("words", "bytes"):
    raise ValueError(f"DISTLLM_GGUF_GEMV must be 'words' or 'bytes', got {GEMV_KERNEL!r}.")

# Word geometry per type: (word dtype, words per block TW, quant words per unit QW, bytes per
# word E, values per unit UV). A type missing here always runs the byte kernel.
_WORDS = {
    GGMLType.Q8_0: (torch.int16, 17, 16, 2, 32),
    GGMLType.Q4_0: (torch.int16, 9, 8, 2, 32),
    GGMLType.Q4_1: (torch.int32, 5, 4, 4, 32),
    GGMLType.Q4_K: (torch.int32, 36, 8, 4, 64),
    GGMLType.Q6_K: (torch.int16, 105, 16, 2, 128),
}
# Measured word-GEMV tiles (BLOCK_N, UNITS, num_warps) by (type name, N, K, M): the dict that
# ``benchmarks/bench_gguf_quant.py --gemv-sweep --gemv-types Q4_1,Q8_0`` printed on an H200
# (2026-11-27; SmolLM2-135M and Llama-8B shapes). Other shapes take the heuristic in
# ``gemv_words_config``.
GEMV_WORDS_CONFIG: dict[tuple[str, int, int, int], tuple[int, int, int]] = {
    ('Q4_1', 960, 576, 1): (4, 32, 16),
    ('Q4_1', 960, 576, 2): (8, 32, 16),
    ('Q4_1', 576, 576, 1): (2, 32, 8),
    ('Q4_1', 576, 576, 2): (4, 32, 8),
    ('Q4_1', 3072, 576, 1): (8, 32, 8),
    ('Q4_1', 3072, 576, 2): (16, 32, 8),
    ('Q4_1', 576, 1536, 1): (2, 32, 8),
    ('Q4_1', 576, 1536, 2): (2, 32, 8),
    ('Q8_0', 49152, 576, 1): (8, 4, 1),
    ('Q8_0', 49152, 576, 2): (16, 4, 1),
    ('Q8_0', 4096, 4096, 1): (8, 16, 4),
    ('Q8_0', 4096, 4096, 2): (16, 16, 4),
    ('Q8_0', 6144, 4096, 1): (8, 16, 2),
    ('Q8_0', 6144, 4096, 2): (16, 16, 2),
    ('Q8_0', 4096, 14336, 1): (8, 16, 4),
    ('Q8_0', 4096, 14336, 2): (16, 16, 4),
    ('Q4_1', 4096, 4096, 1): (4, 32, 8),
    ('Q4_1', 4096, 4096, 2): (4, 32, 8),
    ('Q4_1', 6144, 4096, 1): (8, 16, 8),
    ('Q4_1', 6144, 4096, 2): (8, 16, 8),
    ('Q4_1', 4096, 14336, 1): (4, 32, 8),
    ('Q4_1', 4096, 14336, 2): (4, 32, 8),
}
_WORDS_TILE_VALUES = 8192  # heuristic: values decoded per program per K step at most
_WORDS_MAX_UNITS = 32  # heuristic: at most this many units per K step
_WORDS_MIN_PROGRAMS_PER_SM = 2


def _next_pow2(v: int) -> int:
    return 1 << max(0, v - 1).bit_length()


def gemv_words_config(t: GGMLType, n: int, k: int, m: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, UNITS per K step, num_warps) of the word GEMV for y [m, n] = x [m, k] @ W.T.

    GEMV_WORDS_CONFIG first (exact (type, n, k, m), then the same shape at m = 1); else: units
    per step = the whole row up to 32 units (a power of two: short rows such as SmolLM2's K = 576
    take one step, padded and masked), BLOCK_N = the largest of 16, 8, .. that still gives >= 2
    programs per SM (the grid is n / BLOCK_N x m), shrinking units until a step decodes at most
    _WORDS_TILE_VALUES values, and one warp per 128 quant words of a step (1..8: ~4 words in
    flight per thread)."""
    for key in ((t.name, n, k, m), (t.name, n, k, 1)):
        if key in GEMV_WORDS_CONFIG:
            return GEMV_WORDS_CONFIG[key]
    _, _, _, _, uv = _WORDS[t]
    n_units = max(1, k // uv)
    units = min(_next_pow2(n_units), _WORDS_MAX_UNITS, max(1, _WORDS_TILE_VALUES // uv))
    sms = _sm_count(device) if device.type == "cuda" else 132
    block_n = 16
    while block_n > 1 and triton.cdiv(n, block_n) * m < _WORDS_MIN_PROGRAMS_PER_SM * sms:
        block_n //= 2
    while units > 1 and block_n * units * uv > _WORDS_TILE_VALUES:
        units //= 2
    words = block_n * units * _WORDS[t][2] * (3 if t == GGMLType.Q6_K else 1)  # quant words loaded per step
    warps = min(8, max(1, _next_pow2(words // 128)))  # ~4 words in flight per thread
    return block_n, units, warps


def gemv_words_view(qweight: torch.Tensor, t: GGMLType) -> torch.Tensor | None:
    """``qweight`` [N, bytes] as [N, words] of the type's word dtype (a zero-copy view), or None
    where that is not legal: row bytes, row stride, storage offset or data pointer not a multiple
    of the word size, or a type without a word kernel."""
    geo = _WORDS.get(t)
    if geo is None:
        return None
    ws = geo[0].itemsize
    if (qweight.stride(1) != 1 or qweight.shape[1] % ws or qweight.stride(0) % ws
            or qweight.storage_offset() % ws or qweight.data_ptr() % ws):
        return None
    try:
        return qweight.view(geo[0])
    except RuntimeError:
        return None


def gguf_gemv(x: torch.Tensor, qweight: torch.Tensor, t: GGMLType, y: torch.Tensor,
              kernel: str | None = None, config: tuple[int, int, int] | None = None) -> str:
    """y [M, N] = x [M, K] @ dequant(W).T with a GEMV kernel (one program per BLOCK_N rows and x
    row). ``kernel``: 'words' or 'bytes' (default GEMV_KERNEL); 'words' falls back to 'bytes'
    where the word view is not legal. ``config``: the words tile (BLOCK_N, UNITS, num_warps),
    default ``gemv_words_config``. Returns the kernel that ran."""
    m, k = x.shape
    n = qweight.shape[0]
    words = gemv_words_view(qweight, t) if (kernel or GEMV_KERNEL) == "words" else None
    if words is not None:
        _, tw, qw, e, uv = _WORDS[t]
        block_n, units, warps = config or gemv_words_config(t, n, k, m, x.device)
        launch(_gemv_words_kernel, (triton.cdiv(n, block_n), m),
            x, words, y, n, k, x.stride(0), words.stride(0), y.stride(0),
            QTYPE=int(t), TW=tw, QW=qw, E=e, UV=uv, BLOCK_N=block_n, UNITS=units, num_warps=warps,
            **launch_options(use_pdl(x)),
        )
        return "words"
    ub, uv, units = _UNITS[t]
    block_n, warps = gemv_tile(t, n, m, x.device)
    launch(_gemv_kernel, (triton.cdiv(n, block_n), m),
        x, qweight, y, n, k, x.stride(0), qweight.stride(0), y.stride(0),
        QTYPE=int(t), TS=LAYOUTS[t].type_size, BLOCK_N=block_n, UNITS=units, UB=ub, UV=uv, num_warps=warps,
    )
    return "bytes"
