"""Triton paged attention: prefill chunks and decode tokens of a mixed batch in one launch.

Same signature and semantics as `paged_attention.paged_attention_ref` (layouts documented
there), plus two optional host ints so the grid is sized without a device sync:

    paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                    causal=True, max_query_len=None, max_seq_len=None, num_splits=None)

Design
------
* One program = one query tile of one sequence x one kv head (x one KV split).
  The tile packs BLOCK_Q consecutive new tokens of the sequence times all GROUP query heads
  that share the kv head (GQA packing): row m of the [BLOCK_M, D] tile is token
  m // GROUP_PAD, head kvh * GROUP + m % GROUP_PAD. Each K/V tile is therefore loaded once
  per kv-head group, and decode (1 token x GROUP heads) still feeds tl.dot with >= 16 rows.
* Grid axis 0 enumerates query tiles of all sequences without knowing per-sequence lengths
  on the host: sequence b owns tiles [qsl[b] // BLOCK_Q + b, qsl[b+1] // BLOCK_Q + b + 1),
  so the grid is num_tokens // BLOCK_Q + batch and each program finds its sequence by a
  binary search over query_start_loc (tiles past a sequence's end exit at once). The grid
  depends only on tensor shapes, which keeps the launch CUDA-graph friendly. When no query
  is longer than one token (decode), program b is sequence b and the search is skipped.
* The KV loop walks BLOCK_N keys at a time (several pages): each key's physical block is
  looked up in the block table, so BLOCK_N is independent of the page size. Causal tiles
  stop at their last query's position. fp32 accumulation, online softmax in the exp2
  domain (scale * log2(e) folded into the scores).
* Split-KV (flash-decoding): with num_splits > 1 grid axis 2 divides each tile's KV range
  into up to num_splits chunks of whole KV-loop blocks; programs write unnormalised fp32
  partials (acc, running max, running sum) and a small reduce kernel combines them. Chosen on
  CUDA when the batch has short queries and too few (tile, kv head) programs to fill the GPU
  (`_choose_splits`). A context shorter than the grid was sized for leaves the last splits
  empty: they mark themselves so (l = 0) and exit. The split count is a runtime argument, so
  every split count shares one compiled kernel.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from distllm.ops.launch import launch
from distllm.ops.pdl import launch_options, pdl_wait, use_pdl

_LOG2E = 1.4426950408889634
# The Triton interpreter's tl.dot mishandles bfloat16 (numpy has no bf16): upcast there.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tuning knobs (host side).
PREFILL_BLOCK_M = 64  # rows (tokens x heads) of a query tile when a batch holds prefills
DECODE_BLOCK_M = 16  # minimum rows of a decode tile (tl.dot wants >= 16)
BLOCK_N = 64  # keys per KV-loop iteration (spans several pages)
PROGRAMS_PER_SM = 4  # split-KV target: (tile, kv head, split) programs per SM
MAX_SPLITS = 64
NUM_STAGES = 2  # software pipelining depth of the KV loop
# Decode batches (one-token queries) whose programs walk long KV ranges (at most
# LONG_WALK_MAX_SPLITS splits) take DECODE_NUM_STAGES and, with KVH_FAST, kv heads on grid axis
# 0: the programs running at once then read the heads of the same sequences, which lie side by
# side in a page. On an H200, with the one-program-a-sequence grid, 256 sequences x 832 keys
# took 206.8 us against 222.5 before (93% to 100% of the copy bandwidth); with 4 or more splits
# (a few KV blocks a program) the pair cost 0.4-1.4 us, so those keep NUM_STAGES and sequences
# first (benchmarks/README.md, fifteenth session).
DECODE_BLOCK_N = BLOCK_N
DECODE_NUM_STAGES = 3
LONG_WALK_MAX_SPLITS = 2
KVH_FAST = os.environ.get("DISTLLM_PAGED_ATTN_KVH_FAST", "1") == "1"  # 0: sequences first, to time it
# Warps a program: 0 = the rule below (4 up to 64 x 128 tile elements, else 8). Compiled for
# sm_90 offline as the launcher compiles it (benchmarks/kernel_aot.py paged_attn, 32 heads, 8 kv
# heads, head dim 128; unit strides specialised to 1, so the K/V tiles stream through cp.async),
# none spills: split decode 91 registers a thread at 4 warps and 80 at 8, 512-token prefill tiles
# 209 and 134 (Triton 3.6; 3.9: 80 / 76 and 186 / 135). DISTLLM_PAGED_ATTN_WARPS=8 selects 8
# everywhere, to time it: decode at 256 x 832 keys took 234.0 us against 206.8 at 4 warps (H200).
FORCED_WARPS = int(os.environ.get("DISTLLM_PAGED_ATTN_WARPS", "0"))


# The batch size and the block-table width change from step to step: one compile for all
# (each CUDA-graph batch size would otherwise compile its own variants at start-up).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt", "num_splits"])
def _paged_attn_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_o_ptr,
    part_m_ptr,
    part_l_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    qsl_ptr,
    scale_log2,
    num_seqs,
    num_splits,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_ot,
    stride_oh,
    stride_od,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_kcd,
    stride_vcb,
    stride_vcs,
    stride_vch,
    stride_vcd,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    DOT_F32: tl.constexpr,
    ONE_TOKEN: tl.constexpr = False,
    KVH_FAST: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)  # see ops/pdl.py
    if KVH_FAST:
        kvh = tl.program_id(0)
        pid_q = tl.program_id(1)
    else:
        pid_q = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)

    if ONE_TOKEN:
        # At most one new token a sequence: program pid_q is sequence pid_q. The binary search
        # below is a chain of dependent loads that every decode program would wait on.
        seq = pid_q
    else:
        # Which sequence owns query tile pid_q: the last b with qsl[b] // BLOCK_Q + b <= pid_q.
        lo = pid_q * 0  # int32 tensors (num_seqs may be specialised to a constexpr 1)
        hi = lo + num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            first_tile = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
            go_right = first_tile <= pid_q
            lo = tl.where(go_right, mid + 1, lo)
            hi = tl.where(go_right, hi, mid)
        seq = lo - 1

    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if ONE_TOKEN:
        tile_q0 = 0
    else:
        tile_q0 = (pid_q - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if tile_q0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len  # position of the sequence's first new token

    offs_m = tl.arange(0, BLOCK_M)
    q_local = offs_m // GROUP_PAD
    q_idx = tile_q0 + q_local
    head_in_group = offs_m % GROUP_PAD
    row_valid = (q_local < BLOCK_Q) & (q_idx < q_len) & (head_in_group < GROUP)
    head = kvh * GROUP + head_in_group
    tok = (q_start + q_idx).to(tl.int64)
    qpos = ctx + q_idx

    if CAUSAL:
        kv_end = tl.minimum(seq_len, ctx + tl.minimum(tile_q0 + BLOCK_Q, q_len))
    else:
        kv_end = seq_len
    if not SPLIT:
        n_lo = 0
        n_hi = kv_end
    else:
        # At least one KV-loop block a split: a grid sized for a longer context (a CUDA graph
        # captured for max_model_len) leaves the splits past this context empty.
        n_chunks = tl.cdiv(kv_end, BLOCK_N)
        per_split = tl.cdiv(n_chunks, num_splits) * BLOCK_N
        n_lo = split * per_split
        n_hi = tl.minimum(kv_end, n_lo + per_split)
        if n_lo >= n_hi:
            # Mark the split empty (l = 0) and skip the rest: the reduce never reads its acc.
            part = (tok * NUM_HEADS + head) * num_splits + split
            tl.store(part_m_ptr + part, tl.full([BLOCK_M], -1.0e30, dtype=tl.float32), mask=row_valid)
            tl.store(part_l_ptr + part, tl.zeros([BLOCK_M], dtype=tl.float32), mask=row_valid)
            return

    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: fully masked rows stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kvh.to(tl.int64) * stride_kch
    v_base = v_cache_ptr + kvh.to(tl.int64) * stride_vch
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        blk = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        in_page = offs_n % PAGE_SIZE
        k = tl.load(
            k_base + blk[None, :] * stride_kcb + in_page[None, :] * stride_kcs + offs_d[:, None] * stride_kcd,
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        )  # [BLOCK_D, BLOCK_N]
        if DOT_F32:
            k = k.to(tl.float32)
        if IEEE_DOT:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * scale_log2
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= qpos[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(
            v_base + blk[:, None] * stride_vcb + in_page[:, None] * stride_vcs + offs_d[None, :] * stride_vcd,
            mask=n_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [BLOCK_N, BLOCK_D]
        if DOT_F32:
            v = v.to(tl.float32)
        if IEEE_DOT:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if not SPLIT:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & d_mask[None, :],
        )
    else:
        part = (tok * NUM_HEADS + head) * num_splits + split  # [BLOCK_M]
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        tl.store(
            part_o_ptr + part[:, None] * HEAD_DIM + offs_d[None, :],
            acc,
            mask=row_valid[:, None] & d_mask[None, :],
        )


# The split count is a runtime value: one compile serves every CUDA-graph batch size.
@triton.jit(do_not_specialize=["num_splits"])
def _split_reduce_kernel(
    out_ptr,
    part_o_ptr,
    part_m_ptr,
    part_l_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    stride_od,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    pdl_wait(USE_PDL)  # see ops/pdl.py
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    base = (t * NUM_HEADS + h) * num_splits
    m = tl.load(part_m_ptr + base + offs_s, mask=s_mask, other=-1.0e30)
    l = tl.load(part_l_ptr + base + offs_s, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(s_mask, tl.exp2(m - m_max), 0.0)
    denom = tl.sum(w * l, 0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    o = tl.load(  # an empty split (l = 0) wrote no acc
        part_o_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
        mask=(s_mask & (l > 0.0))[:, None] & d_mask[None, :],
        other=0.0,
    )
    o = tl.sum(o * w[:, None], 0) / denom
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d * stride_od, o.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _choose_splits(q: torch.Tensor, programs: int, max_query_len: int, max_seq_len: int | None, seq_lens: torch.Tensor,
                   block_n: int = BLOCK_N) -> int:
    """Split the KV range when a short-query batch leaves SMs idle.

    About four programs an SM, each with at least one KV-loop block: within 0.7 µs of the best
    split count in all 14 shapes of `bench_attention.py --split-sweep` (H200, CUDA graphs). With
    max_seq_len = max_model_len (CUDA graphs) shorter contexts leave splits empty, and an empty
    split exits at once."""
    if not q.is_cuda or max_query_len > 16:
        return 1
    sms = _sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())  # device sync: callers should pass it
    by_sms = (PROGRAMS_PER_SM * sms) // max(programs, 1)
    by_len = triton.cdiv(max_seq_len, block_n)
    return max(1, min(by_sms, by_len, MAX_SPLITS))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    causal: bool = True,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """out [T, H, D]; see the module docstring.

    max_query_len / max_seq_len: host ints (pass them: computing them syncs with the device,
    which also breaks CUDA-graph capture when a split-KV decision needs max_seq_len). Any
    split count is correct for any context length, so a decode graph captured with
    max_seq_len = the model's max length stays valid for every replay.
    num_splits: force the split-KV count (tests, benchmarks); None = heuristic (CUDA only).
    """
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, d_cache = k_cache.shape
    assert d_cache == head_dim and v_cache.shape == k_cache.shape
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    batch = seq_lens.shape[0]
    assert query_start_loc.shape[0] == batch + 1
    out = torch.empty_like(q)
    if num_tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    one_token = max_query_len <= 1
    if one_token:
        block_m = max(DECODE_BLOCK_M, group_pad)
        block_q = 1
    else:
        block_m = max(PREFILL_BLOCK_M if block_d <= 128 else PREFILL_BLOCK_M // 2, group_pad)
        block_q = block_m // group_pad
        # Don't spread a short query over mostly-empty rows.
        block_q = min(block_q, triton.next_power_of_2(max_query_len))
        block_m = max(DECODE_BLOCK_M, block_q * group_pad)
    block_n = DECODE_BLOCK_N if one_token else BLOCK_N
    block_n = block_n if block_d <= 128 else block_n // 2
    # One tile a sequence when no query is longer than a token; else see the module docstring.
    num_tiles = batch if one_token else num_tokens // block_q + batch
    busy_tiles = min(num_tiles, batch * triton.cdiv(max_query_len, block_q))

    if num_splits is None:
        num_splits = _choose_splits(q, busy_tiles * num_kv_heads, max_query_len, max_seq_len, seq_lens, block_n)
    num_splits = max(1, int(num_splits))

    if num_splits > 1:
        part_o = torch.empty((num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_o = part_m = part_l = out  # unused

    num_warps = FORCED_WARPS or (4 if block_m * block_d <= 64 * 128 else 8)
    long_walk = one_token and num_splits <= LONG_WALK_MAX_SPLITS
    kvh_fast = long_walk and KVH_FAST
    grid = (num_kv_heads, num_tiles, num_splits) if kvh_fast else (num_tiles, num_kv_heads, num_splits)
    launch(_paged_attn_kernel, grid,
        q,
        k_cache,
        v_cache,
        out,
        part_o,
        part_m,
        part_l,
        block_tables,
        seq_lens,
        query_start_loc,
        float(scale) * _LOG2E,
        batch,
        num_splits,
        *q.stride(),
        *out.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        block_tables.stride(0),
        NUM_HEADS=num_heads,
        GROUP=group,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        SPLIT=num_splits > 1,
        CAUSAL=bool(causal),
        IEEE_DOT=q.dtype == torch.float32,
        DOT_F32=_INTERPRET and k_cache.dtype == torch.bfloat16,
        ONE_TOKEN=one_token,
        KVH_FAST=kvh_fast,
        num_warps=num_warps,
        num_stages=DECODE_NUM_STAGES if long_walk else NUM_STAGES,
        **launch_options(use_pdl(q)),
    )
    if num_splits > 1:
        launch(_split_reduce_kernel, (num_tokens, num_heads),
            out,
            part_o,
            part_m,
            part_l,
            num_splits,
            *out.stride(),
            NUM_HEADS=num_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            # Two compiles serve every split count; the few-split batches, which launch the most
            # reduce programs, keep a small tile.
            SPLITS_PAD=8 if num_splits <= 8 else max(MAX_SPLITS, triton.next_power_of_2(num_splits)),
            num_warps=4 if block_d >= 128 else 2,
            **launch_options(use_pdl(q)),
        )
    return out
