"""One-shot all-reduce over peer memory (NVLink P2P), written in Triton: push, then sum locally.

Every rank owns one buffer that all peers can address (torch symmetric memory, set up by
`distllm.distributed.custom_all_reduce`): data slots [2 parities][W senders][SLOT elements],
then int64 flags [W senders][MAX_BLOCKS blocks]. One kernel launch per all-reduce, per rank:

1. push: write this rank's input (the part this program block owns) into slot
   [parity][RANK] of every peer's buffer. NVLink writes are posted: no round trip;
2. signal: after a block-wide barrier, store the call's sequence number into flag
   [RANK][block] of every peer (release, system scope), one lane per peer;
3. wait until flag [p][block] of this rank's own buffer holds at least that sequence number
   for every peer p (acquire, polling local memory);
4. sum: own input plus the peers' slots, in fp32, in rank order 0..W-1 (so every rank
   computes bit-identical results, like NCCL does); write the output (may be the input).

One NVLink trip per call, where a pull design pays a flag round trip, a read round trip and
an end barrier: a peer may still be reading this call's slot when a rank starts the next
call, so consecutive calls alternate between two parities, and no end barrier is needed.
A rank can be at most one call ahead of a peer (it cannot finish call k + 1 before every
peer has started call k + 1, i.e. finished call k), so when it writes parity k % 2 again,
in call k + 2, every peer is done reading it. Flags are compared with >= for the same
reason: a peer one call ahead may already have stored the next number.

The sequence number is one int64 per rank in local device memory (`state`: [seq, blocks
done]), read by every block at the start of a call and advanced by the last block to
finish, so it is the same for every block of a call whatever the grid, and it lives on the
device: a captured CUDA graph replays correctly any number of times, and eager calls in
between share it. int64 never wraps in practice.

`tl.debug_barrier()` (bar.sync) before the release makes the other threads' pushes part of
what is released; the one after the acquire makes the peers' data visible to every thread
of the block (the PTX memory model makes release/acquire cumulative through bar.sync). Peer
slots are loaded with ".cg" (L2, not L1) so nothing stale from an earlier call is read.

Every wait is bounded by `max_spin` polls; a timed-out wait adds 1 to `err` and goes on.
The engine passes a practically infinite bound (going on after a timeout would return wrong
sums silently), the start-up self-test a short one, so a broken setup is found and turned
off instead of hanging the engine.
"""

from __future__ import annotations

import triton
import triton.language as tl

from distllm.ops.launch import launch
from distllm.ops.pdl import launch_options, pdl_wait, use_pdl

# Program blocks per launch (also the flag slots per sender) and elements per block and
# step. Small messages are latency-bound whatever these are; MB-sized ones need many loads
# and stores in flight to fill NVLink (Little's law: ~400 GB/s x ~1.5 µs ~ 600 KB).
MAX_BLOCKS = 128
BLOCK = 2048
NUM_WARPS = 4
NUM_STAGES = 1  # a streaming copy and sum gain nothing from software pipelining


def flag_words(world_size: int) -> int:
    """int64 flags one rank's buffer holds: one per (sender, block)."""
    return world_size * MAX_BLOCKS


def data_bytes(world_size: int, slot_bytes: int) -> int:
    """Bytes of one rank's data slots: 2 parities x world_size senders x slot_bytes."""
    return 2 * world_size * slot_bytes


def grid_size(numel: int) -> int:
    return max(1, min(triton.cdiv(numel, BLOCK), MAX_BLOCKS))


@triton.jit
def _signal_and_wait(flag_addrs, pid, seq, max_spin, err_ptr, RANK: tl.constexpr, WORLD: tl.constexpr,
                     NUM_SLOTS: tl.constexpr):
    """Steps 2-3: raise flag [RANK][pid] = seq in every peer (release, after a block barrier so
    every thread's pushes are covered), then poll this rank's flags [p][pid] >= seq (acquire)."""
    lanes = tl.arange(0, WORLD)
    peers = lanes != RANK
    tl.debug_barrier()  # every thread's pushes happen before the release below
    bases = tl.load(flag_addrs + lanes)
    to_peer = (bases + (RANK * NUM_SLOTS + pid) * 8).to(tl.pointer_type(tl.int64), bitcast=True)
    tl.atomic_xchg(to_peer, seq + lanes.to(tl.int64) * 0, mask=peers, sem="release", scope="sys")
    own = tl.load(flag_addrs + RANK)
    from_peer = (own + (lanes * NUM_SLOTS + pid) * 8).to(tl.pointer_type(tl.int64), bitcast=True)
    got = tl.atomic_add(from_peer, 0, mask=peers, sem="acquire", scope="sys")
    done = (got >= seq) | (peers == 0)
    spins = max_spin * 0  # an int32 tensor, like the value it is re-assigned in the loop
    while (tl.min(done.to(tl.int32), axis=0) == 0) & (spins < max_spin):
        got = tl.atomic_add(from_peer, 0, mask=peers, sem="acquire", scope="sys")
        done = done | (got >= seq)
        spins += 1
    missed = tl.sum((done == 0).to(tl.int32), axis=0)
    if missed > 0:
        tl.atomic_add(err_ptr, missed)
    tl.debug_barrier()  # the acquired data is visible to every thread after this


@triton.jit
def _advance(state_ptr, seq, nprog):
    """Step 5: the last block to finish advances the sequence number (every other block has read
    it). A lone block (a decode row) just stores it: no atomic round trip at the kernel's tail."""
    if nprog == 1:
        tl.store(state_ptr, seq)
    elif tl.atomic_add(state_ptr + 1, 1) == nprog - 1:
        tl.store(state_ptr + 1, 0)
        tl.store(state_ptr, seq)


@triton.jit
def _sum_in_rank_order(x_ptr, bufs, offs, m, parity, slot_elems, RANK: tl.constexpr, WORLD: tl.constexpr,
                       BLOCK_SIZE: tl.constexpr):
    """Step 4: own part from x, the peers' from slots [parity][p] of this rank's buffer, in fp32."""
    acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for p in tl.static_range(WORLD):
        if p == RANK:
            acc += tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        else:
            src = bufs[RANK] + (parity * WORLD + p) * slot_elems + offs
            acc += tl.load(src, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
    return acc


@triton.jit
def _push(x_ptr, bufs, offs, m, dst, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Step 1 for one tile: x[offs] into slot [parity][RANK] (offset dst) of every peer."""
    v = tl.load(x_ptr + offs, mask=m)
    for p in tl.static_range(WORLD):
        if p != RANK:
            tl.store(bufs[p] + dst + offs, v, mask=m)


# max_spin differs between the self-test and the engine: one compiled kernel for both.
@triton.jit(do_not_specialize=["max_spin"])
def one_shot_all_reduce_kernel(
    x_ptr,
    out_ptr,
    bufs,  # tuple of WORLD tensors: every rank's data slots (same dtype as x)
    flag_addrs,  # int64[WORLD] on this device: address of every rank's int64 flags
    state_ptr,  # int64[2] on this device: [calls completed, blocks done in this call]
    err_ptr,  # int32 on this device: timed-out waits
    n,
    slot_elems,  # elements per (parity, sender) slot
    max_spin,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,  # 2, 4 or 8: one tl.arange lane per rank needs a power of two
    NUM_SLOTS: tl.constexpr,  # MAX_BLOCKS
    BLOCK_SIZE: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    # PDL (ops/pdl.py): launched while the layer's last GEMV drains, and lets the next
    # layer's GEMV launch and fetch its first weight tile while this call waits on NVLink.
    pdl_wait(USE_PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    step = nprog * BLOCK_SIZE
    seq = tl.load(state_ptr) + 1
    parity = seq % 2
    dst = (parity * WORLD + RANK) * slot_elems
    # while, not range(): the Triton 3.6 interpreter can't take a grid-sized range step.
    start = pid * BLOCK_SIZE
    while start < n:
        offs = start + tl.arange(0, BLOCK_SIZE)
        _push(x_ptr, bufs, offs, offs < n, dst, RANK, WORLD)
        start += step
    _signal_and_wait(flag_addrs, pid, seq, max_spin, err_ptr, RANK, WORLD, NUM_SLOTS)
    start = pid * BLOCK_SIZE
    while start < n:
        offs = start + tl.arange(0, BLOCK_SIZE)
        m = offs < n
        acc = _sum_in_rank_order(x_ptr, bufs, offs, m, parity, slot_elems, RANK, WORLD, BLOCK_SIZE)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)
        start += step
    _advance(state_ptr, seq, nprog)


@triton.jit(do_not_specialize=["max_spin"])
def all_reduce_add_rms_norm_kernel(
    x_ptr,  # [n_rows, N] this rank's partial sums (a row-parallel layer's output)
    res_ptr,  # [n_rows, N] the residual stream
    w_ptr,  # [N] the norm's weight
    out_ptr,  # [n_rows, N] rms_norm(all_reduce(x) + residual)
    res_out_ptr,  # [n_rows, N] all_reduce(x) + residual
    bufs,
    flag_addrs,
    state_ptr,
    err_ptr,
    n_rows,
    N,
    eps,
    slot_elems,
    max_spin,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    NUM_SLOTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    HAS_RES: tl.constexpr = True,
):
    """The all-reduce above with a whole row per block step, then the residual add and the
    RMSNorm of `triton_norm` on the reduced row, rounded where that path rounds: one launch
    for what is otherwise an all-reduce and a norm kernel. HAS_RES=False: no residual (the
    first layer's norm of the summed embeddings); res_out gets the sum itself."""
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)  # no kernel writes it: before the wait
    pdl_wait(USE_PDL)  # as in one_shot_all_reduce_kernel
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    seq = tl.load(state_ptr) + 1
    parity = seq % 2
    dst = (parity * WORLD + RANK) * slot_elems
    row = pid
    while row < n_rows:
        _push(x_ptr, bufs, row.to(tl.int64) * N + cols, cmask, dst, RANK, WORLD)
        row += nprog
    _signal_and_wait(flag_addrs, pid, seq, max_spin, err_ptr, RANK, WORLD, NUM_SLOTS)
    in_dtype = x_ptr.dtype.element_ty
    row = pid
    while row < n_rows:
        offs = row.to(tl.int64) * N + cols
        acc = _sum_in_rank_order(x_ptr, bufs, offs, cmask, parity, slot_elems, RANK, WORLD, BLOCK_N)
        # Rounded as the all-reduce output, then as torch's x + residual (triton_norm's rules).
        if HAS_RES:
            r = tl.load(res_ptr + offs, mask=cmask, other=0.0)
            xs = (acc.to(in_dtype).to(tl.float32) + r.to(tl.float32)).to(in_dtype)
        else:
            xs = acc.to(in_dtype)
        tl.store(res_out_ptr + offs, xs, mask=cmask)
        xf = xs.to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
        y = (xf * rstd).to(in_dtype).to(tl.float32)  # HF: cast before the weight
        tl.store(out_ptr + offs, (y * w).to(out_ptr.dtype.element_ty), mask=cmask)
        row += nprog
    _advance(state_ptr, seq, nprog)


def launch_one_shot(x, out, bufs: tuple, flag_addrs, state, err, rank: int, max_spin: int) -> None:
    """out = sum over ranks of x. x and out are contiguous with x.numel() elements (out may be
    x); bufs: every rank's data slots (x's dtype, data_bytes() long); flag_addrs: int64 tensor,
    the address of every rank's flag_words() int64 flags (zeroed before first use); state:
    this rank's int64[2] (zeroed before first use)."""
    n = x.numel()
    world = len(bufs)
    slot_elems = bufs[rank].numel() // (2 * world)
    launch(one_shot_all_reduce_kernel, (grid_size(n),),
        x, out, bufs, flag_addrs, state, err, n, slot_elems, max_spin,
        **one_shot_options(rank, world, x),
    )


def one_shot_options(rank: int, world: int, x) -> dict:
    """Compile-time arguments and launch options of one_shot_all_reduce_kernel for x (shared
    with the precompile in distributed/custom_all_reduce, so both reach the same variant)."""
    return dict(RANK=rank, WORLD=world, NUM_SLOTS=MAX_BLOCKS, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS,
                num_stages=NUM_STAGES, **launch_options(use_pdl(x)))


# Rows the fused all-reduce + add + RMSNorm keeps in registers (one row per block step).
MAX_NORM_ROW = 16384


def launch_all_reduce_add_rms_norm(x, residual, weight, eps: float, out, res_out, bufs: tuple, flag_addrs, state,
                                   err, rank: int, max_spin: int) -> None:
    """out, res_out = rms_norm(sum over ranks of x + residual), sum over ranks of x + residual.
    x, residual, out, res_out: contiguous [n_rows, N] (N <= MAX_NORM_ROW); residual may be None
    (nothing added); weight [N]; the other arguments as for launch_one_shot."""
    n_rows, n = x.shape
    world = len(bufs)
    slot_elems = bufs[rank].numel() // (2 * world)
    block_n = triton.next_power_of_2(n)
    launch(all_reduce_add_rms_norm_kernel, (max(1, min(n_rows, MAX_BLOCKS)),),
        x, x if residual is None else residual, weight, out, res_out, bufs, flag_addrs, state, err, n_rows, n, eps,
        slot_elems, max_spin, RANK=rank, WORLD=world, NUM_SLOTS=MAX_BLOCKS, BLOCK_N=block_n,
        num_warps=max(1, min(16, block_n // 512)), num_stages=NUM_STAGES, HAS_RES=residual is not None,
        **launch_options(use_pdl(x)),
    )
