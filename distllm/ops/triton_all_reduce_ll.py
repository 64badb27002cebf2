"""All-reduce + residual add + RMSNorm for decode rows, with the flag in every word (LL).

The one-shot kernels of `triton_all_reduce` push the data, then raise a flag per block with a
system-scope release: the release waits until every pushed byte has landed in the peer, and the
peer then needs one more NVLink trip to see the flag. Here every 8-byte word a rank pushes
carries its own flag: the high 32 bits hold the call's flag, the low 32 bits two 16-bit
elements (an aligned 8-byte store reaches the peer whole, so a word showing this call's flag
holds this call's data). No fence, no separate flag: a peer polls the words themselves
(volatile loads) until every one shows the flag. The price is twice the bytes on NVLink, which
for decode's few-KB rows is nothing against the trip saved; hence only rows of 16-bit elements
and messages of at most LL_SLOT_BYTES / 2 bytes (larger ones take the flag kernel).

Layout: a region of every rank's symmetric buffer (after the flag kernel's data slots and
flags): int64 words [2 parities][W senders][LL_SLOT_WORDS]. Parities as in triton_all_reduce
(a rank is at most one call ahead of any peer, and both kernels count calls with the same
`state`). The flag of call `seq` is seq % (2**31 - 1) + 1: never 0. A rank clears each word it
has read back to 0, so a word left from an earlier call never shows a current flag, however
many calls ago it was written; the peer's next write to that word comes two calls later, after
this kernel has ended.

Off by default: measured slower than the flag kernel on 2 x H200 (one 4096-wide bf16 row in a
CUDA graph: 6.6-7.5 against 4.7-5.5 us, twelfth and eighteenth sessions, benchmarks/README.md;
TP=2 decode 369.7 against 373.7 tok/s). DISTLLM_ALL_REDUCE_LL=1 turns it on, when every rank
sets it (distributed/custom_all_reduce checks that they agree: a rank using it while a peer did
not would wait forever).
"""

from __future__ import annotations

import triton
import triton.language as tl

from distllm.ops.launch import launch
from distllm.ops.pdl import launch_options, pdl_wait, use_pdl
from distllm.ops.triton_all_reduce import MAX_BLOCKS, _advance

# Bytes of one (parity, sender) slot: 32K words, 64K 16-bit elements (16 rows of 4096).
LL_SLOT_BYTES = 256 << 10
LL_SLOT_WORDS = LL_SLOT_BYTES // 8


def region_bytes(world_size: int) -> int:
    """Bytes of one rank's LL region: 2 parities x world_size senders x LL_SLOT_BYTES."""
    return 2 * world_size * LL_SLOT_BYTES


def fits(n_rows: int, n: int, element_size: int) -> bool:
    """Can [n_rows, n] rows of this element size go through the LL slots?"""
    return element_size == 2 and n % 2 == 0 and 0 < n_rows * n // 2 <= LL_SLOT_WORDS


@triton.jit
def _receive(src, mask, flag, max_spin, err_ptr):
    """The words at src [BLOCK] once each shows `flag` (volatile loads: from L2, not a stale
    L1 line), then cleared to 0 in place. A wait past max_spin polls adds 1 to err and goes on."""
    words = tl.load(src, mask=mask, other=0, volatile=True)
    ok = ((words >> 32) == flag) | (mask == 0)
    spins = max_spin * 0  # an int32 tensor, like the value it is re-assigned in the loop
    while (tl.min(ok.to(tl.int32), axis=0) == 0) & (spins < max_spin):
        again = tl.load(src, mask=mask & (ok == 0), other=0, volatile=True)
        words = tl.where(ok, words, again)
        ok = ((words >> 32) == flag) | (mask == 0)
        spins += 1
    if tl.sum((ok == 0).to(tl.int32), axis=0) > 0:
        tl.atomic_add(err_ptr, 1)
    tl.store(src, tl.zeros_like(words), mask=mask)
    return words


@triton.jit
def _element(words, SHIFT: tl.constexpr, DTYPE: tl.constexpr):
    """The 16-bit element at bit SHIFT of each word's low half, as float32."""
    return ((words >> SHIFT) & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)


@triton.jit(do_not_specialize=["max_spin"])
def ll_all_reduce_add_rms_norm_kernel(
    x_ptr,  # [n_rows, N] this rank's partial sums (16-bit), N even
    res_ptr,  # [n_rows, N] the residual stream
    w_ptr,  # [N] the norm's weight
    out_ptr,  # [n_rows, N] rms_norm(all_reduce(x) + residual)
    res_out_ptr,  # [n_rows, N] all_reduce(x) + residual
    ll_bufs,  # tuple of WORLD int64 tensors: every rank's LL region
    state_ptr,  # int64[2] on this device: [calls completed, blocks done in this call]
    err_ptr,  # int32 on this device: timed-out waits
    n_rows,
    N,
    eps,
    slot_words,
    max_spin,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK_W: tl.constexpr,  # words (element pairs) of a row, a power of two
    USE_PDL: tl.constexpr = False,
    HAS_RES: tl.constexpr = True,  # False: no residual added (as in triton_all_reduce)
):
    """triton_all_reduce.all_reduce_add_rms_norm_kernel's result, rounded where it rounds (only
    the order of the sum of squares differs), one row per block step; even and odd elements of
    a row travel as one word and are summed side by side."""
    pdl_wait(USE_PDL)  # as in triton_all_reduce
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = tl.load(state_ptr) + 1
    parity = seq % 2
    flag = seq % 2147483647 + 1
    dtype = x_ptr.dtype.element_ty
    half = N // 2
    pairs = tl.arange(0, BLOCK_W)
    pmask = pairs < half
    x_bits = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    row = pid
    while row < n_rows:
        bits = tl.load(x_bits + row.to(tl.int64) * half + pairs, mask=pmask, other=0)
        word = (flag.to(tl.int64) << 32) | (bits.to(tl.int64) & 0xFFFFFFFF)
        dst = (parity * WORLD + RANK) * slot_words + row.to(tl.int64) * half + pairs
        for p in tl.static_range(WORLD):
            if p != RANK:
                tl.store(ll_bufs[p] + dst, word, mask=pmask)
        row += nprog
    even = 2 * pairs
    w_e = tl.load(w_ptr + even, mask=pmask, other=0.0).to(tl.float32)
    w_o = tl.load(w_ptr + even + 1, mask=pmask, other=0.0).to(tl.float32)
    row = pid
    while row < n_rows:
        offs = row.to(tl.int64) * N + even
        acc_e = tl.zeros((BLOCK_W,), dtype=tl.float32)
        acc_o = tl.zeros((BLOCK_W,), dtype=tl.float32)
        for p in tl.static_range(WORLD):  # rank order, as every rank sums (bit-identical results)
            if p == RANK:
                acc_e += tl.load(x_ptr + offs, mask=pmask, other=0.0).to(tl.float32)
                acc_o += tl.load(x_ptr + offs + 1, mask=pmask, other=0.0).to(tl.float32)
            else:
                src = ll_bufs[RANK] + (parity * WORLD + p) * slot_words + row.to(tl.int64) * half + pairs
                words = _receive(src, pmask, flag, max_spin, err_ptr)
                acc_e += _element(words, 0, dtype)
                acc_o += _element(words, 16, dtype)
        # Rounded as the all-reduce output, then as torch's x + residual (triton_norm's rules).
        if HAS_RES:
            r_e = tl.load(res_ptr + offs, mask=pmask, other=0.0).to(tl.float32)
            r_o = tl.load(res_ptr + offs + 1, mask=pmask, other=0.0).to(tl.float32)
            xs_e = (acc_e.to(dtype).to(tl.float32) + r_e).to(dtype)
            xs_o = (acc_o.to(dtype).to(tl.float32) + r_o).to(dtype)
        else:
            xs_e = acc_e.to(dtype)
            xs_o = acc_o.to(dtype)
        tl.store(res_out_ptr + offs, xs_e, mask=pmask)
        tl.store(res_out_ptr + offs + 1, xs_o, mask=pmask)
        xf_e = xs_e.to(tl.float32)
        xf_o = xs_o.to(tl.float32)
        rstd = tl.math.rsqrt((tl.sum(xf_e * xf_e, axis=0) + tl.sum(xf_o * xf_o, axis=0)) / N + eps)
        y_e = (xf_e * rstd).to(dtype).to(tl.float32) * w_e  # HF: cast before the weight
        y_o = (xf_o * rstd).to(dtype).to(tl.float32) * w_o
        tl.store(out_ptr + offs, y_e.to(out_ptr.dtype.element_ty), mask=pmask)
        tl.store(out_ptr + offs + 1, y_o.to(out_ptr.dtype.element_ty), mask=pmask)
        row += nprog
    _advance(state_ptr, seq, nprog)


def ll_options(rank: int, world: int, x) -> dict:
    """Compile-time arguments and launch options for x [n_rows, N] (shared with the precompile)."""
    block_w = triton.next_power_of_2(max(1, x.shape[-1] // 2))
    return dict(RANK=rank, WORLD=world, BLOCK_W=block_w, num_warps=max(1, min(8, block_w // 256)), num_stages=1,
                **launch_options(use_pdl(x)))


def launch_ll_all_reduce_add_rms_norm(x, residual, weight, eps: float, out, res_out, ll_bufs: tuple, state, err,
                                      rank: int, max_spin: int) -> None:
    """out, res_out = rms_norm(sum over ranks of x + residual), sum over ranks of x + residual.
    x, residual, out, res_out: contiguous [n_rows, N] of a 16-bit dtype (fits()), x 4-byte
    aligned (its element pairs are read as 32-bit words); residual may be None; weight [N];
    ll_bufs: every rank's LL region as int64 (region_bytes() long, zeroed before first use);
    state, err: as for triton_all_reduce.launch_one_shot (the same state)."""
    n_rows, n = x.shape
    if not fits(n_rows, n, x.element_size()):
        raise ValueError(f"[{n_rows}, {n}] {x.dtype} rows don't fit the LL slots ({LL_SLOT_WORDS} words)")
    if x.data_ptr() % 4:
        raise ValueError("x must start on a 4-byte boundary (its element pairs are read as 32-bit words)")
    world = len(ll_bufs)
    launch(ll_all_reduce_add_rms_norm_kernel, (max(1, min(n_rows, MAX_BLOCKS)),),
           x, x if residual is None else residual, weight, out, res_out, ll_bufs, state, err, n_rows, n, eps,
           ll_bufs[rank].numel() // (2 * world), max_spin, HAS_RES=residual is not None, **ll_options(rank, world, x))
