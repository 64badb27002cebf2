"""Decode attention in one launch: rotary (and Qwen3's q/k norms), the KV-cache store, paged
attention and the split-KV reduce.

    decode_attention(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                     block_tables, seq_lens, scale, max_seq_len,
                     q_weight=None, k_weight=None, eps=1e-6, num_splits=None) -> out [B, H, D]

Same result as `triton_rotary.rotary_embedding(..., kv_store=...)` followed by
`triton_paged_attention.paged_attention` on a decode batch (one new token per sequence, at
position seq_lens[b] - 1; q [B, H, D] and k/v [B, Hkv, D] are the qkv projection's output
before the rotary, any row and head strides). A decode layer ran those as three kernels (rotary
+ store, attention, split reduce), each a link of the step's dependent chain that mostly waits
on memory latency: on an H200 they added ~2.5, ~4.8 and ~2.9 us to each 8B layer's ~124 us at
batch 1; this kernel adds ~6.9 us (torch.profiler traces, benchmarks/README.md, tenth
session). Here:

* One program = one sequence x one kv head x one KV split, as in the paged attention's decode
  tiles (the GROUP query heads of a kv head are the rows of a [BLOCK_M, D] tile).
* Before the PDL wait (ops/pdl.py) a program loads what no kernel of this forward writes: the
  step's inputs (positions, seq_lens, slots, block table), the cos/sin row, the norm weights,
  and its split's first KV tile, from cache entries written by earlier steps. That is most of
  its memory latency, and it overlaps the qkv projection's tail. The one entry this step writes
  (the new token's, at seq_len - 1) is stale then: the program holding it takes the new key and
  value from registers instead, and writes them into the cache after the wait.
* q and the new key are rotated (and normalised) in registers: each head row is loaded twice,
  once as is and once with its halves swapped, so out = x * cos + sign * x_swapped * sin needs
  no shuffle. Rounding follows the rotary kernel: cos/sin rounded to q's dtype, fp32 math, one
  rounding of the result.
* Split-KV without a second kernel: each split writes its fp32 partials, then takes a ticket
  from a per-(sequence, kv head) counter (an acq_rel atomic); the last of the sequence's active
  splits combines them and resets the counter to 0 for the next launch. The counters live in
  one zeroed buffer per device that every launch leaves zeroed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from distllm.ops.launch import launch
from distllm.ops.pdl import launch_options, pdl_wait, use_pdl
from distllm.ops.triton_paged_attention import BLOCK_N, DECODE_BLOCK_M, _choose_splits

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# DISTLLM_FUSED_DECODE_ATTENTION=0: decode layers run the three kernels instead (for A/B runs).
ENABLED = os.environ.get("DISTLLM_FUSED_DECODE_ATTENTION", "1").strip().lower() not in ("0", "false", "no", "off")
# Decode batches of at most MAX_BATCH sequences take it; larger ones the three kernels. 8B shape
# on an H200 (same machine): batch-1 decode 4% faster fused, but in 512 / out 256 at batches
# 2 / 8 / 16 / 32 / 64 / 256 the three kernels gave 430.7 / 1,633 / 3,060 / 5,613 / 10,081 /
# 18,606 decode tok/s against 428.3 / 1,569 / 2,949 / 5,287 / 8,293 / 14,007 fused, and
# long256 (bench_fastpath.py) 17,718 against 13,444 output tok/s.
MAX_BATCH = int(os.environ.get("DISTLLM_FUSED_DECODE_MAX_BATCH", "1"))
# Warps a program. Compiled for sm_90 offline with the launcher's divisibility hints
# (benchmarks/kernel_aot.py, head dim 128, Triton 3.6), 4 warps take 251 registers a thread and 8
# take 172, neither spilling; 8 were no faster: 8B batch-1 decode (bench_tp_decode.py
# --tp 1, H200, two alternations) 241.3 / 234.6 tok/s with 8 against 239.7 / 239.8 with 4, so 4
# stays. DISTLLM_DECODE_ATTN_WARPS=8 selects 8.
NUM_WARPS = int(os.environ.get("DISTLLM_DECODE_ATTN_WARPS", "4"))
# One int32 counter per (sequence, kv head) of a launch: 1024 sequences x 64 kv heads. A batch
# needing more runs unsplit (no counters).
NUM_COUNTERS = 1 << 16
_counters: dict[torch.device, torch.Tensor] = {}


@triton.jit
def _rope_rows(rows, offs_d, swap_d, sign, cos, sin, w, w_swap, mask, eps,
               HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr):
    """Rotate (after Qwen3's RMSNorm over the head) the head rows at ``rows`` [R, 1] -> [R, BLOCK_D]
    in their dtype. swap_d / sign: the partner element of each d and the sign its sin term takes."""
    ty = rows.dtype.element_ty
    x = tl.load(rows + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    xs = tl.load(rows + swap_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:  # rounded where fused_ref.rms_norm_ref rounds
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None]
        x = ((x * rstd).to(ty).to(tl.float32) * w[None, :]).to(ty).to(tl.float32)
        xs = ((xs * rstd).to(ty).to(tl.float32) * w_swap[None, :]).to(ty).to(tl.float32)
    return (x * cos[None, :] + sign[None, :] * (xs * sin[None, :])).to(ty)


@triton.jit
def _attend_tile(q, k, v, offs_n, n_mask, pos, k_new, v_new, m_i, l_i, acc, scale_log2,
                 IEEE_DOT: tl.constexpr, DOT_F32: tl.constexpr):
    """One online-softmax step over keys offs_n ([BLOCK_D, BLOCK_N] k, [BLOCK_N, BLOCK_D] v),
    with the new token's key and value (at ``pos``) taken from k_new [BLOCK_D, 1] / v_new [1, BLOCK_D]."""
    k = tl.where(offs_n[None, :] == pos, k_new, k)
    v = tl.where(offs_n[:, None] == pos, v_new, v)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE_DOT:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = tl.where(n_mask[None, :], s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _decode_attn_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, qw_ptr, kw_ptr, eps,
    k_cache_ptr, v_cache_ptr, slot_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_o_ptr, part_m_ptr, part_l_ptr, counter_ptr,
    scale_log2, num_splits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cs,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_bt,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_NORM: tl.constexpr, SPLIT: tl.constexpr, IEEE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    HALF: tl.constexpr = HEAD_DIM // 2

    # ---- Before the wait: the step's inputs, weights, and cache entries of earlier steps only.
    seq_len = tl.load(seq_lens_ptr + b)
    pos = seq_len - 1  # the new token's position (padding rows: seq_len 1, slot -1)
    n_chunks = tl.cdiv(seq_len, BLOCK_N)
    per_split = tl.cdiv(n_chunks, num_splits) * BLOCK_N
    n_lo = split * per_split
    n_hi = tl.minimum(seq_len, n_lo + per_split)
    if n_lo >= n_hi:  # past the context (a grid sized for a longer one): not counted below
        pdl_wait(USE_PDL)
        return
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    swap_d = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    sign = tl.where(offs_d < HALF, -1.0, 1.0)
    cs_row = cos_sin_ptr + tl.load(pos_ptr + b).to(tl.int64) * stride_cs
    ty = q_ptr.dtype.element_ty
    cos = tl.load(cs_row + offs_d, mask=d_mask, other=0.0).to(ty).to(tl.float32)  # row: cos|cos|sin|sin
    sin = tl.load(cs_row + HEAD_DIM + offs_d, mask=d_mask, other=0.0).to(ty).to(tl.float32)
    if HAS_NORM:
        qw = tl.load(qw_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        qw_s = tl.load(qw_ptr + swap_d, mask=d_mask, other=0.0).to(tl.float32)
        kw = tl.load(kw_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32)
        kw_s = tl.load(kw_ptr + swap_d, mask=d_mask, other=0.0).to(tl.float32)
    else:  # unused
        qw = cos
        qw_s = cos
        kw = cos
        kw_s = cos
    slot = tl.load(slot_ptr + b).to(tl.int64)
    bt_row = block_tables_ptr + b * stride_bt
    k_base = k_cache_ptr + kvh.to(tl.int64) * stride_kch
    v_base = v_cache_ptr + kvh.to(tl.int64) * stride_vch
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_hi
    blk = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    in_page = offs_n % PAGE_SIZE
    k = tl.load(k_base + blk[None, :] * stride_kcb + in_page[None, :] * stride_kcs + offs_d[:, None],
                mask=n_mask[None, :] & d_mask[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
    v = tl.load(v_base + blk[:, None] * stride_vcb + in_page[:, None] * stride_vcs + offs_d[None, :],
                mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]

    pdl_wait(USE_PDL)
    # ---- After the wait: the qkv projection's output.
    offs_m = tl.arange(0, BLOCK_M)
    head_in_group = offs_m % GROUP_PAD
    row_valid = (offs_m < GROUP_PAD) & (head_in_group < GROUP)
    head = kvh * GROUP + head_in_group
    q = _rope_rows(q_ptr + b * stride_qt + head[:, None] * stride_qh, offs_d, swap_d, sign, cos, sin, qw, qw_s,
                   row_valid[:, None] & d_mask[None, :], eps, HEAD_DIM, HAS_NORM)  # [BLOCK_M, BLOCK_D]
    one = tl.arange(0, 1)
    k_new = _rope_rows(k_ptr + b * stride_kt + kvh * stride_kh + one[:, None], offs_d, swap_d, sign, cos, sin,
                       kw, kw_s, d_mask[None, :], eps, HEAD_DIM, HAS_NORM).to(k_cache_ptr.dtype.element_ty)
    v_new = tl.load(v_ptr + b * stride_vt + kvh * stride_vh + one[:, None] + offs_d[None, :],
                    mask=d_mask[None, :], other=0.0).to(v_cache_ptr.dtype.element_ty)  # [1, BLOCK_D]
    if (pos >= n_lo) & (pos < n_hi) & (slot >= 0):  # this split holds the new token: store it
        page, in_pg = slot // PAGE_SIZE, slot % PAGE_SIZE
        tl.store(k_base + page * stride_kcb + in_pg * stride_kcs + offs_d[None, :], k_new, mask=d_mask[None, :])
        tl.store(v_base + page * stride_vcb + in_pg * stride_vcs + offs_d[None, :], v_new, mask=d_mask[None, :])
    if DOT_F32:
        q = q.to(tl.float32)
    k_new = tl.trans(k_new)  # [BLOCK_D, 1]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i, l_i, acc = _attend_tile(q, k, v, offs_n, n_mask, pos, k_new, v_new, m_i, l_i, acc, scale_log2,
                                 IEEE_DOT, DOT_F32)
    for n0 in range(n_lo + BLOCK_N, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        blk = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_page = offs_n % PAGE_SIZE
        k = tl.load(k_base + blk[None, :] * stride_kcb + in_page[None, :] * stride_kcs + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        v = tl.load(v_base + blk[:, None] * stride_vcb + in_page[:, None] * stride_vcs + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        m_i, l_i, acc = _attend_tile(q, k, v, offs_n, n_mask, pos, k_new, v_new, m_i, l_i, acc, scale_log2,
                                     IEEE_DOT, DOT_F32)

    out_rows = out_ptr + b * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    out_mask = row_valid[:, None] & d_mask[None, :]
    if not SPLIT:
        tl.store(out_rows, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = (b * NUM_HEADS + head) * num_splits  # [BLOCK_M]: split 0's partial of each row
        tl.store(part_m_ptr + part + split, m_i, mask=row_valid)
        tl.store(part_l_ptr + part + split, l_i, mask=row_valid)
        tl.store(part_o_ptr + (part + split)[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are written before the ticket (release)
        counter = counter_ptr + b * NUM_KV_HEADS + kvh
        ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        active = tl.cdiv(seq_len, per_split)
        if ticket == active - 1:  # the last split to finish combines them all
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
            m_all = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
            l_all = tl.zeros([BLOCK_M], dtype=tl.float32)
            o_all = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for s in range(0, active):
                m_s = tl.load(part_m_ptr + part + s, mask=row_valid, other=-1.0e30, cache_modifier=".cg")
                l_s = tl.load(part_l_ptr + part + s, mask=row_valid, other=0.0, cache_modifier=".cg")
                o_s = tl.load(part_o_ptr + (part + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=out_mask,
                              other=0.0, cache_modifier=".cg")
                m_new = tl.maximum(m_all, m_s)
                a_old = tl.exp2(m_all - m_new)
                a_s = tl.exp2(m_s - m_new)
                l_all = l_all * a_old + l_s * a_s
                o_all = o_all * a_old[:, None] + o_s * a_s[:, None]
                m_all = m_new
            l_all = tl.where(l_all > 0.0, l_all, 1.0)
            tl.store(out_rows, (o_all / l_all[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)


def _counter_buffer(device: torch.device) -> torch.Tensor:
    buf = _counters.get(device)
    if buf is None:
        buf = _counters[device] = torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device)
    return buf


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    num_splits: int | None = None,
) -> torch.Tensor:
    """out [B, H, D] for one new token per sequence (see the module docstring); k/v go into the
    caches at slot_mapping (-1: padding, not stored). max_seq_len: a host bound on seq_lens (the
    model's max length under CUDA graphs). num_splits: force the split-KV count (tests)."""
    batch, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, d_cache = k_cache.shape
    assert k.shape == v.shape == (batch, num_kv_heads, head_dim) and d_cache == head_dim, (q.shape, k.shape, k_cache.shape)
    assert num_heads % num_kv_heads == 0 and head_dim % 2 == 0, (num_heads, num_kv_heads, head_dim)
    assert positions.shape == slot_mapping.shape == seq_lens.shape == (batch,), (positions.shape, seq_lens.shape)
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and k_cache.stride(-1) == v_cache.stride(-1) == 1
    assert cos_sin_cache.shape[-1] == 2 * head_dim and cos_sin_cache.stride(-1) == 1, cos_sin_cache.shape
    has_norm = q_weight is not None
    if has_norm:
        assert k_weight is not None and q_weight.shape == k_weight.shape == (head_dim,), (q_weight, k_weight)
        q_weight, k_weight = q_weight.contiguous(), k_weight.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = BLOCK_N if block_d <= 128 else BLOCK_N // 2
    if num_splits is None:
        num_splits = _choose_splits(q, batch * num_kv_heads, 1, max_seq_len, seq_lens, block_n)
    num_splits = max(1, int(num_splits))
    if batch * num_kv_heads > NUM_COUNTERS:
        num_splits = 1
    if num_splits > 1:
        part_o = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
        counters = _counter_buffer(q.device)
    else:
        part_o = part_m = part_l = counters = out  # unused
    launch(_decode_attn_kernel, (batch, num_kv_heads, num_splits),
        q, k, v, positions, cos_sin_cache,
        q_weight if has_norm else q, k_weight if has_norm else k, float(eps),
        k_cache, v_cache, slot_mapping, block_tables, seq_lens,
        out, part_o, part_m, part_l, counters,
        float(scale) * _LOG2E, num_splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim,
        BLOCK_D=block_d, PAGE_SIZE=page_size, BLOCK_M=max(DECODE_BLOCK_M, group_pad), BLOCK_N=block_n,
        HAS_NORM=has_norm, SPLIT=num_splits > 1, IEEE_DOT=q.dtype == torch.float32,
        DOT_F32=_INTERPRET and k_cache.dtype == torch.bfloat16,
        num_warps=NUM_WARPS, num_stages=2,
        **launch_options(use_pdl(q)),
    )
    return out
