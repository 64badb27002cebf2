"""One-shot all-reduce over peer memory (NVLink P2P), written in Triton.

Every rank owns one buffer that all peers can address (torch symmetric memory, set up by
`distllm.distributed.custom_all_reduce`). One kernel launch per all-reduce, per rank:

1. copy this rank's input into its own buffer (the part this program block owns);
2. barrier "start": tell every peer "my part is written", wait until every peer said the same;
3. read the same part from every rank's buffer, sum in fp32 in rank order 0..W-1 (so every
   rank computes bit-identical results, like NCCL does), write the output (may be the input);
4. barrier "end": nobody may overwrite its buffer in the next call while a peer still reads it.

Barriers are per program block: block b of every rank copies, reads and signals the same
elements (same n, same grid on every rank), so block b only ever waits for block b of the
peers; blocks never wait for each other on one GPU, so no co-residency is needed.

Flags, and why they survive CUDA-graph replay (the classic bug is a host-side counter, or a
host-chosen phase, baked into the captured launch, so the second replay waits for a value
the peers already wrote): every flag is a self-resetting mailbox, one int32 per (channel,
block, sender) in the receiver's buffer. The sender turns it 0 -> 1 (compare-and-swap,
release, system scope), retrying while it is still 1, i.e. while the receiver has not yet
consumed the previous signal; the receiver turns it 1 -> 0 (acquire, system scope). After
every barrier all mailboxes are 0 again, so each launch, eager or replayed, starts from the
same state and the kernel arguments can be identical on every replay. Two channels keep the
start and end signals of one launch apart for readability; one would also be correct, as
signals on a mailbox are consumed in the order they are sent.

A barrier handles all peers at once: one lane (one thread; Triton runs an atomic once per
distinct element) per peer, retrying only the lanes whose swap has not happened yet, so
W=8 costs one NVLink round trip, not seven in a row. `tl.debug_barrier()` (bar.sync) before
the release makes the other threads' copies part of what is released; the one after the
acquire makes the peers' data visible to every thread of the block (the PTX memory model
makes release/acquire cumulative through bar.sync). Peer data is loaded with ".cg" (L2, not
L1) so nothing stale from an earlier launch can be read.

Every spin is bounded by `max_spin` tries; a timed-out wait adds 1 to `err` and goes on. The
engine passes a practically infinite bound (going on after a timeout would return wrong sums
silently), the start-up self-test a short one, so a broken setup is found and turned off
instead of hanging the engine.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Program blocks per launch (also the flag slots per channel) and elements per block and
# step. Small messages are latency-bound (two flag round trips), whatever these are. MB-sized
# ones need many loads in flight to fill NVLink (Little's law: ~400 GB/s x ~1.5 µs ~ 600 KB):
# 128 blocks x 128 threads x 2 loads of 16 B = 512 KB per peer per step. First guesses, to
# be tuned with benchmarks/bench_allreduce.py (not measured yet).
MAX_BLOCKS = 128
BLOCK = 2048
NUM_WARPS = 4
# No software pipelining: it could turn the peer loads into asynchronous copies issued ahead,
# and a streaming sum gains nothing from it.
NUM_STAGES = 1


def flag_words(world_size: int) -> int:
    """int32 mailboxes one rank's buffer holds: 2 channels x MAX_BLOCKS blocks x senders."""
    return 2 * MAX_BLOCKS * world_size


def grid_size(numel: int) -> int:
    return max(1, min(triton.cdiv(numel, BLOCK), MAX_BLOCKS))


@triton.jit
def _cas_all(ptrs, todo, expect, new, max_spin, err_ptr, SEM: tl.constexpr):
    """Compare-and-swap every lane's mailbox `ptrs` from expect to new (system scope), lanes in
    parallel, retrying the lanes that have not yet succeeded. Lanes with todo == 0 are skipped:
    their compare value is -1, which no mailbox ever holds, so the swap never happens."""
    zero = todo.to(tl.int32) * 0  # compare and swap values must match the lanes' shape
    new_v = zero + new
    done = todo == 0
    old = tl.atomic_cas(ptrs, tl.where(done, zero - 1, zero + expect), new_v, sem=SEM, scope="sys")
    done = done | (old == expect)
    spins = max_spin * 0  # an int32 tensor, like the value it is re-assigned in the loop
    while (tl.min(done.to(tl.int32), axis=0) == 0) & (spins < max_spin):
        old = tl.atomic_cas(ptrs, tl.where(done, zero - 1, zero + expect), new_v, sem=SEM, scope="sys")
        done = done | (old == expect)
        spins += 1
    missed = tl.sum((done == 0).to(tl.int32), axis=0)
    if missed > 0:
        tl.atomic_add(err_ptr, missed)


@triton.jit
def _block_barrier(flag_addrs, slot, max_spin, err_ptr, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Block-level barrier with the same block of every peer, one lane per peer. `slot` is
    this (channel, block)'s first mailbox; mailbox slot + s holds sender s's signal."""
    lanes = tl.arange(0, WORLD)
    peers = lanes != RANK
    bases = tl.load(flag_addrs + lanes)  # int64: every rank's mailbox array
    tl.debug_barrier()  # every thread's earlier accesses happen before the release below
    to_peer = (bases + (slot + RANK) * 4).to(tl.pointer_type(tl.int32), bitcast=True)
    _cas_all(to_peer, peers, 0, 1, max_spin, err_ptr, "release")
    own = tl.load(flag_addrs + RANK)
    from_peer = (own + (slot + lanes) * 4).to(tl.pointer_type(tl.int32), bitcast=True)
    _cas_all(from_peer, peers, 1, 0, max_spin, err_ptr, "acquire")
    tl.debug_barrier()  # the acquired data is visible to every thread after this


# max_spin differs between the self-test and the engine: one compiled kernel for both.
@triton.jit(do_not_specialize=["max_spin"])
def one_shot_all_reduce_kernel(
    x_ptr,
    out_ptr,
    bufs,  # tuple of WORLD tensors: every rank's data buffer (same dtype as x)
    flag_addrs,  # int64[WORLD] on this device: address of every rank's int32 mailboxes
    err_ptr,  # int32 on this device: timed-out waits
    n,
    max_spin,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,  # 2, 4 or 8: one tl.arange lane per rank needs a power of two
    NUM_SLOTS: tl.constexpr,  # MAX_BLOCKS
    BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK_SIZE
    own = bufs[RANK]
    # while, not range(): the Triton 3.6 interpreter can't take a grid-sized range step.
    start = pid * BLOCK_SIZE
    while start < n:
        offs = start + tl.arange(0, BLOCK_SIZE)
        m = offs < n
        tl.store(own + offs, tl.load(x_ptr + offs, mask=m), mask=m)
        start += step

    _block_barrier(flag_addrs, pid * WORLD, max_spin, err_ptr, RANK, WORLD)

    start = pid * BLOCK_SIZE
    while start < n:
        offs = start + tl.arange(0, BLOCK_SIZE)
        m = offs < n
        acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
        for p in tl.static_range(WORLD):
            acc += tl.load(bufs[p] + offs, mask=m, other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=m)
        start += step

    _block_barrier(flag_addrs, (NUM_SLOTS + pid) * WORLD, max_spin, err_ptr, RANK, WORLD)


def launch_one_shot(x, out, bufs: tuple, flag_addrs, err, rank: int, max_spin: int) -> None:
    """out = sum over ranks of x. x and out are contiguous with x.numel() elements (out may be
    x); bufs: every rank's data buffer (x's dtype, >= x.numel() elements); flag_addrs: int64
    tensor, the address of every rank's flag_words() int32 mailboxes (zeroed before first use)."""
    n = x.numel()
    world = len(bufs)
    one_shot_all_reduce_kernel[(grid_size(n),)](
        x, out, bufs, flag_addrs, err, n, max_spin,
        RANK=rank, WORLD=world, NUM_SLOTS=MAX_BLOCKS, BLOCK_SIZE=BLOCK, num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
