"""Custom all-reduce: the decisions (when it may be used, when NCCL stays), and the one-shot
and flag-in-word (LL) Triton kernels under the interpreter, with the peers simulated in one
process.

A simulated rank sees its peers' buffers as local tensors already holding their inputs, and
its own mailboxes already holding the peers' signals (as if they had arrived first); after
the launch its mailboxes must be consumed and each peer must hold exactly its signals.
"""

import os

_PREV_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import importlib

import pytest
import torch

import triton  # noqa: F401  (a missing or broken interpreter must fail these tests, not skip)
from triton.runtime.interpreter import InterpretedFunction

import distllm.ops.pdl as _pdl
import distllm.ops.triton_all_reduce as _tar
import distllm.ops.triton_all_reduce_ll as _ll
from distllm.distributed import custom_all_reduce as car_mod
from distllm.distributed import parallel_state as ps
from distllm.distributed.custom_all_reduce import (
    BUFFER_BYTES,
    DEFAULT_MAX_BYTES,
    ENV_DISABLE,
    ENV_ENABLE,
    ENV_MAX_BYTES,
    CustomAllReduce,
    init_custom_all_reduce,
    max_bytes_for,
    topology_reason,
    unsupported_reason,
)
from distllm.ops.fused_ref import fused_add_rms_norm_ref, rms_norm_ref


@pytest.fixture(autouse=True, scope="module")
def _interpreted_kernels():
    """Another module (tests/gpu/conftest.py) may have switched the kernels to compiled mode."""
    os.environ["TRITON_INTERPRET"] = "1"
    # The kernels call ops/pdl's jit helpers, which an earlier test may have imported compiled.
    for mod, fn in ((_pdl, "pdl_wait"), (_tar, "pdl_wait"), (_tar, "one_shot_all_reduce_kernel"),
                    (_ll, "ll_all_reduce_add_rms_norm_kernel")):
        if not isinstance(getattr(mod, fn), InterpretedFunction):
            importlib.reload(mod)
    yield
    if _PREV_INTERPRET is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREV_INTERPRET


# --- decisions ---------------------------------------------------------------------------

@pytest.mark.parametrize("ws", [2, 4, 8])
def test_supported_world_sizes(ws):
    assert unsupported_reason("cuda", ws, env={}) is None


@pytest.mark.parametrize("ws", [1, 3, 6, 16])
def test_unsupported_world_sizes(ws):
    assert "world size" in unsupported_reason("cuda", ws, env={})


def test_cpu_is_unsupported():
    assert "cpu" in unsupported_reason("cpu", 2, env={})


@pytest.mark.parametrize("value,off", [("1", True), ("true", True), ("0", False), ("", False), ("off", False)])
def test_env_switch(value, off):
    reason = unsupported_reason("cuda", 2, env={ENV_DISABLE: value})
    assert (reason is not None) == off
    if off:
        assert ENV_DISABLE in reason


@pytest.mark.parametrize("value,off", [("0", True), ("off", True), ("1", False), ("", False)])
def test_on_by_default_and_env_enable_zero_turns_it_off(value, off):
    assert unsupported_reason("cuda", 4, env={}) is None  # default: on
    reason = unsupported_reason("cuda", 4, env={ENV_ENABLE: value})
    assert (reason is not None) == off
    if off:
        assert ENV_ENABLE in reason


def test_engine_option_reaches_the_workers():
    from distllm.config import EngineArgs, EngineConfig

    for flag in (False, True):
        cfg = EngineArgs(model=None, disable_custom_all_reduce=flag, device="cpu").create_engine_config()
        assert EngineConfig.from_dict(cfg.to_dict()).parallel_config.disable_custom_all_reduce is flag


def test_max_bytes_defaults_and_override():
    assert max_bytes_for(2, env={}) == DEFAULT_MAX_BYTES[2] <= BUFFER_BYTES
    assert max_bytes_for(8, env={}) == DEFAULT_MAX_BYTES[8] < DEFAULT_MAX_BYTES[2]
    assert max_bytes_for(4, env={ENV_MAX_BYTES: "65536"}) == 65536
    assert max_bytes_for(2, env={ENV_MAX_BYTES: str(BUFFER_BYTES * 4)}) == BUFFER_BYTES  # clamped
    assert "is 0" in unsupported_reason("cuda", 2, env={ENV_MAX_BYTES: "0"})


def test_topology():
    yes = lambda a, b: True  # noqa: E731
    assert topology_reason([7, 7], [0, 1], 0, yes) is None
    assert "hosts" in topology_reason([7, 8], [0, 1], 0, yes)
    assert "share" in topology_reason([7, 7], [0, 0], 1, yes)
    no_1_2 = lambda a, b: {a, b} != {1, 2}  # noqa: E731
    assert topology_reason([7] * 4, [0, 1, 2, 3], 0, no_1_2) is None
    assert "cuda:1 can't access peer cuda:2" in topology_reason([7] * 4, [0, 1, 2, 3], 1, no_1_2)


@pytest.mark.parametrize("device,ws", [(torch.device("cpu"), 2), (torch.device("cuda", 0), 1), (torch.device("cuda", 0), 3)])
def test_init_returns_none_without_collectives(device, ws):
    # No process group exists here: any collective attempt would raise.
    assert init_custom_all_reduce(None, 0, ws, device) is None


def test_enable_for_tp_is_a_no_op_at_tp1():
    assert ps.get_tp_size() == 1
    assert car_mod.enable_for_tp(torch.device("cpu"), disabled=True) is False
    assert car_mod.enable_for_tp(torch.device("cpu")) is False
    assert ps._TP.custom_ar is None


def _fake_car(world: int = 2, rank: int = 0, max_bytes: int = 64 << 10) -> CustomAllReduce:
    peers = tuple(torch.zeros(car_mod.buffer_bytes(world), dtype=torch.uint8) for _ in range(world))
    return CustomAllReduce(rank=rank, world_size=world, device=torch.device("cpu"), max_bytes=max_bytes,
                           peers_u8=peers)


def test_should_use():
    car = _fake_car(max_bytes=64 << 10)
    assert car.should_use(torch.zeros(4, 4096, dtype=torch.bfloat16))  # 32 KB
    assert car.should_use(torch.zeros(32 << 10, dtype=torch.bfloat16))  # exactly the limit
    assert car.should_use(torch.zeros(8, 16, dtype=torch.float32))
    assert car.should_use(torch.zeros(8, 16, dtype=torch.float16))
    assert not car.should_use(torch.zeros((32 << 10) + 1, dtype=torch.bfloat16))  # one element over
    assert not car.should_use(torch.zeros(0, dtype=torch.bfloat16))
    assert not car.should_use(torch.zeros(8, 16, dtype=torch.int32))
    assert not car.should_use(torch.zeros(8, 16, dtype=torch.float64))
    assert not car.should_use(torch.zeros(16, 8, dtype=torch.bfloat16).t())  # not contiguous
    meta = torch.zeros(8, 16, dtype=torch.bfloat16, device="meta")
    assert not car.should_use(meta)  # another device


class _Recorder:
    def __init__(self, use: bool):
        self.use, self.calls = use, []

    def should_use(self, x):
        return self.use

    def all_reduce(self, x):
        self.calls.append(x)
        return x

    def close(self):
        pass


@pytest.mark.parametrize("use", [True, False])
def test_tp_all_reduce_dispatch(monkeypatch, use):
    nccl = []
    monkeypatch.setattr(ps.dist, "all_reduce", lambda x, group=None: nccl.append(x))
    rec = _Recorder(use)
    saved = (ps._TP.size, ps._TP.custom_ar)
    ps._TP.size, ps._TP.custom_ar = 2, rec
    try:
        x = torch.ones(4)
        assert ps.tp_all_reduce(x) is x
    finally:
        ps._TP.size, ps._TP.custom_ar = saved
    assert (len(rec.calls), len(nccl)) == ((1, 0) if use else (0, 1))


def test_destroy_closes_custom_all_reduce():
    closed = []
    rec = _Recorder(True)
    rec.close = lambda: closed.append(True)
    ps.set_custom_all_reduce(rec)
    ps.destroy_tensor_parallel()
    assert closed == [True] and ps._TP.custom_ar is None


# --- the kernel, peers simulated -----------------------------------------------------------

def _inputs(world: int, n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Small integers: every partial sum is exact in every dtype, so the check is exact.
    return [torch.randint(-8, 9, (n,), generator=g).to(dtype) for _ in range(world)]


def _simulate(world: int, rank: int, xs: list[torch.Tensor], max_spin: int = 100, preset: bool = True,
              in_place: bool = False, calls_before: int = 0, peer_ahead: bool = False):
    """One rank's launch with the peers' side done by hand: they pushed their inputs into this
    rank's slots for this call's parity and raised their flags (one call further when
    peer_ahead: a peer may already have signalled the next call)."""
    n = xs[0].numel()
    grid = _tar.grid_size(n)
    slot = n + 5  # slots longer than the message, as in the engine
    seq = calls_before + 1
    bufs = [torch.zeros(2 * world * slot, dtype=xs[0].dtype) for _ in range(world)]
    flags = [torch.zeros(_tar.flag_words(world), dtype=torch.int64) for _ in range(world)]
    if preset:
        for p in range(world):
            if p != rank:
                bufs[rank].view(2, world, slot)[seq % 2, p, :n] = xs[p]
                flags[rank].view(world, _tar.MAX_BLOCKS)[p, :grid] = seq + int(peer_ahead)
    addrs = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
    state = torch.tensor([calls_before, 0], dtype=torch.int64)
    err = torch.zeros(1, dtype=torch.int32)
    x = xs[rank].clone()
    out = x if in_place else torch.full_like(x, 99)
    _tar.launch_one_shot(x, out, tuple(bufs), addrs, state, err, rank, max_spin)
    return out, bufs, flags, int(err.item()), grid, state


@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (4, 2), (8, 7)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,calls_before", [(1, 0), (1000, 1), (4099, 6)])
def test_one_shot_sum_pushes_and_signals(world, rank, dtype, n, calls_before):
    xs = _inputs(world, n, dtype, seed=world * 100 + n)
    out, bufs, flags, err, grid, state = _simulate(world, rank, xs, calls_before=calls_before)
    want = torch.stack([x.float() for x in xs]).sum(0).to(dtype)
    seq = calls_before + 1
    assert err == 0
    assert torch.equal(out, want)
    assert state.tolist() == [seq, 0]  # the call counted once, by the last block
    slot = bufs[0].numel() // (2 * world)
    for p in range(world):
        if p == rank:
            continue
        pushed = bufs[p].view(2, world, slot)
        assert torch.equal(pushed[seq % 2, rank, :n], xs[rank])  # own input pushed to every peer ...
        assert not pushed[1 - seq % 2, rank].any()  # ... into this call's parity only
        sent = flags[p].view(world, _tar.MAX_BLOCKS)
        assert sent[rank, :grid].eq(seq).all() and not sent[rank, grid:].any()  # one flag per block in use
        assert not sent[torch.arange(world) != rank].any()  # only in this rank's row


def test_one_shot_many_tiles_per_block_in_place():
    world, rank, n = 2, 1, (_tar.MAX_BLOCKS + 3) * _tar.BLOCK + 37  # blocks 0-3 take a second tile
    xs = _inputs(world, n, torch.bfloat16, seed=1)
    out, _, _, err, grid, state = _simulate(world, rank, xs, in_place=True, calls_before=3)
    assert grid == _tar.MAX_BLOCKS and err == 0 and state.tolist() == [4, 0]
    assert torch.equal(out, (xs[0].float() + xs[1].float()).to(torch.bfloat16))


def test_one_shot_rank_order_sum():
    """Every rank sums in rank order 0..W-1 in fp32, so all ranks hold identical bits."""
    world, n = 4, 777
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, generator=g) * 10 ** (3 * i) for i in range(world)]  # rounding-sensitive
    outs = [_simulate(world, r, xs)[0] for r in range(world)]
    want = xs[0].clone()
    for x in xs[1:]:
        want = want + x
    for o in outs:
        assert torch.equal(o, want)


def test_peer_one_call_ahead_is_not_waited_for():
    world, n = 2, 300
    xs = _inputs(world, n, torch.float32, seed=5)
    out, _, _, err, _, _ = _simulate(world, 0, xs, max_spin=3, calls_before=2, peer_ahead=True)
    assert err == 0 and torch.equal(out, xs[0] + xs[1])


def test_barrier_times_out_and_counts():
    """No peer ever signals: every wait gives up after max_spin polls and is counted."""
    world, rank, n = 4, 0, 3000
    xs = _inputs(world, n, torch.float32, seed=2)
    _, _, _, err, grid, state = _simulate(world, rank, xs, max_spin=3, preset=False)
    assert err == grid * (world - 1)  # every block, every peer
    assert state.tolist() == [1, 0]


@pytest.mark.parametrize("world,rank", [(2, 1), (4, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,n", [(1, 576), (3, 64), (_tar.MAX_BLOCKS + 5, 32)])
@pytest.mark.parametrize("has_res", [True, False])
def test_all_reduce_add_rms_norm(world, rank, dtype, rows, n, has_res):
    """The fused kernel: the peers' partial rows pushed here, flags raised; its outputs are
    rms_norm(sum + residual) and sum + residual, as the all-reduce then the fused norm give
    (without a residual, the first layer's: rms_norm(sum) and sum).
    (fp16, not bf16: the interpreter truncates float32 -> bfloat16 where GPUs round; bf16 is
    checked compiled in tests/gpu.)"""
    g = torch.Generator().manual_seed(rows * n + world)
    xs = [(torch.randn(rows, n, generator=g)).to(dtype) for _ in range(world)]
    residual = torch.randn(rows, n, generator=g).to(dtype)
    w = (torch.rand(n, generator=g) + 0.5).to(dtype)
    grid = min(rows, _tar.MAX_BLOCKS)
    slot = rows * n + 3
    seq = 3
    bufs = [torch.zeros(2 * world * slot, dtype=dtype) for _ in range(world)]
    flags = [torch.zeros(_tar.flag_words(world), dtype=torch.int64) for _ in range(world)]
    for p in range(world):
        if p != rank:
            bufs[rank].view(2, world, slot)[seq % 2, p, : rows * n] = xs[p].flatten()
            flags[rank].view(world, _tar.MAX_BLOCKS)[p, :grid] = seq
    addrs = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
    state = torch.tensor([seq - 1, 0], dtype=torch.int64)
    err = torch.zeros(1, dtype=torch.int32)
    out, res_out = torch.empty_like(residual), torch.empty_like(residual)
    _tar.launch_all_reduce_add_rms_norm(xs[rank], residual if has_res else None, w, 1e-5, out, res_out, tuple(bufs),
                                        addrs, state, err, rank, 100)
    total = xs[0].float()
    for x in xs[1:]:
        total = total + x.float()
    if has_res:
        want_out, want_res = fused_add_rms_norm_ref(total.to(dtype), residual, w, 1e-5)
    else:
        want_res = total.to(dtype)
        want_out = rms_norm_ref(want_res, w, 1e-5)
    assert int(err) == 0 and state.tolist() == [seq, 0]
    assert torch.equal(res_out, want_res)
    if dtype == torch.float32:
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    else:  # the sum of squares in another order may move a value by one rounding step
        assert (out == want_out).float().mean() > 0.97
        torch.testing.assert_close(out.float(), want_out.float(), rtol=2e-3, atol=2e-3)
    for p in range(world):  # this rank's partial rows pushed to every peer, flags raised
        if p != rank:
            assert torch.equal(bufs[p].view(2, world, slot)[seq % 2, rank, : rows * n], xs[rank].flatten())
            assert flags[p].view(world, _tar.MAX_BLOCKS)[rank, :grid].eq(seq).all()


def test_tp_all_reduce_add_rms_norm_dispatch(monkeypatch):
    """Fused kernel when the custom path takes x; otherwise all-reduce, then the fused norm."""
    x, res, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)
    calls = []

    class _Car(_Recorder):
        def should_use_fused_norm(self, *a):
            return self.use

        def all_reduce_add_rms_norm(self, *a):
            calls.append("fused")
            return a[0], a[1]

    saved = (ps._TP.size, ps._TP.custom_ar)
    monkeypatch.setattr(ps.dist, "all_reduce", lambda t, group=None: calls.append("nccl"))
    try:
        for use in (True, False):
            ps._TP.size, ps._TP.custom_ar = 2, _Car(use)
            ps.tp_all_reduce_add_rms_norm(x, res, w, 1e-6)
        # No residual (the first layer's norm of the embedding's sum): the sum, and its norm.
        ps._TP.size, ps._TP.custom_ar = 2, _Car(False)
        normed, summed = ps.tp_all_reduce_add_rms_norm(x, None, w, 1e-6)
    finally:
        ps._TP.size, ps._TP.custom_ar = saved
    assert calls == ["fused", "nccl", "nccl"]
    assert summed is x and torch.equal(normed, rms_norm_ref(x, w, 1e-6))


def test_custom_all_reduce_layout():
    """CustomAllReduce's views: data slots [parity][sender] at the start of every rank's
    buffer, flags [sender][block] after them; two calls in a row use both parities."""
    world, rank, n = 2, 1, 3000
    car = _fake_car(world, rank)
    slot = BUFFER_BYTES // 2
    mine = car.peers_u8[rank]
    start = _tar.data_bytes(world, BUFFER_BYTES)
    flags = mine[start: start + 8 * _tar.flag_words(world)].view(torch.int64).view(world, _tar.MAX_BLOCKS)
    for call in (1, 2):
        xs = _inputs(world, n, torch.float16, seed=4 + call)
        mine[: 2 * world * BUFFER_BYTES].view(torch.float16).view(2, world, slot)[call % 2, 0, :n] = xs[0]
        flags[0, : _tar.grid_size(n)] = call
        x = xs[rank].clone()
        assert car.all_reduce(x) is x
        assert torch.equal(x, xs[0] + xs[1])
        peer = car.peers_u8[0][: 2 * world * BUFFER_BYTES].view(torch.float16).view(2, world, slot)
        assert torch.equal(peer[call % 2, rank, :n], xs[rank])
    assert car.errors() == 0 and car.state.tolist() == [2, 0]


def test_custom_all_reduce_ll_layout():
    """With use_ll, decode rows' all-reduce + norm goes through the LL region after the flags
    (int64 words [parity][sender][slot]), and counts calls with the flag kernel: a plain
    all-reduce (call 1), then an LL call (call 2, parity 0); rows too large for the LL slots
    take the flag kernel."""
    from distllm.ops import triton_all_reduce_ll as ll
    world, rank, rows, n = 2, 0, 2, 64
    car = _fake_car(world, rank)
    car.use_ll = True
    start = _tar.data_bytes(world, BUFFER_BYTES) + 8 * _tar.flag_words(world)
    region = car.peers_u8[rank][start: start + _ll.region_bytes(world)].view(torch.int64)
    assert region.data_ptr() == car.ll_bufs[rank].data_ptr() and region.numel() == car.ll_bufs[rank].numel()
    car.state[0] = 1  # as after one plain all-reduce
    xs = [t.view(rows, n) for t in _inputs(world, rows * n, torch.float16, seed=11)]
    bits = xs[1].view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF
    region.view(2, world, _ll.LL_SLOT_WORDS)[0, 1, : rows * n // 2] = ((2 % (2**31 - 1) + 1) << 32) | bits
    res, w = torch.zeros(rows, n, dtype=torch.float16), torch.ones(n, dtype=torch.float16)
    out, res_out = car.all_reduce_add_rms_norm(xs[0], res, w, 1e-5)
    assert car.errors() == 0 and car.state.tolist() == [2, 0]
    assert torch.equal(res_out, xs[0] + xs[1])
    torch.testing.assert_close(out, fused_add_rms_norm_ref(xs[0] + xs[1], res, w, 1e-5)[0], rtol=2e-3, atol=2e-3)
    peer = car.ll_bufs[1].view(2, world, _ll.LL_SLOT_WORDS)[0, 0, : rows * n // 2]
    assert torch.equal(peer & 0xFFFFFFFF, xs[0].view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF)
    assert not _ll.fits(17, 4096, 2)  # such rows would take the flag kernel


# --- the flag-in-word (LL) kernel: this rank's LL region already holds the peers' words -----

def _flag(seq: int) -> int:
    return seq % (2**31 - 1) + 1


def _words(x: torch.Tensor, seq: int) -> torch.Tensor:
    """x [rows, N] (16-bit) as LL words: the call's flag over each pair of elements' bits."""
    bits = x.contiguous().view(torch.int32).flatten().to(torch.int64) & 0xFFFFFFFF
    return (_flag(seq) << 32) | bits


def _setup(world, rank, rows, n, seq, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(rows, n, generator=g).half() for _ in range(world)]
    residual = torch.randn(rows, n, generator=g).half()
    w = (torch.rand(n, generator=g) + 0.5).half()
    slot = rows * n // 2 + 5
    regions = [torch.zeros(2 * world * slot, dtype=torch.int64) for _ in range(world)]
    for p in range(world):
        if p != rank:
            regions[rank].view(2, world, slot)[seq % 2, p, : rows * n // 2] = _words(xs[p], seq)
    return xs, residual, w, slot, regions


@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (4, 2)])
@pytest.mark.parametrize("rows,n", [(1, 576), (3, 64), (_tar.MAX_BLOCKS + 3, 16), (2, 90)])
@pytest.mark.parametrize("has_res", [True, False])
def test_ll_all_reduce_add_rms_norm(world, rank, rows, n, has_res):
    """Outputs as the all-reduce then the fused norm give (no residual: the norm of the sum);
    this rank's words pushed to every peer with the call's flag; the words it read cleared; the
    call counted."""
    seq = 7
    xs, residual, w, slot, regions = _setup(world, rank, rows, n, seq, seed=rows * n + world + rank)
    state = torch.tensor([seq - 1, 0], dtype=torch.int64)
    err = torch.zeros(1, dtype=torch.int32)
    out, res_out = torch.empty_like(residual), torch.empty_like(residual)
    _ll.launch_ll_all_reduce_add_rms_norm(xs[rank], residual if has_res else None, w, 1e-5, out, res_out,
                                          tuple(regions), state, err, rank, 100)
    total = xs[0].float()
    for x in xs[1:]:
        total = total + x.float()
    if has_res:
        want_out, want_res = fused_add_rms_norm_ref(total.half(), residual, w, 1e-5)
    else:
        want_res = total.half()
        want_out = rms_norm_ref(want_res, w, 1e-5)
    assert int(err) == 0 and state.tolist() == [seq, 0]
    assert torch.equal(res_out, want_res)
    assert (out == want_out).float().mean() > 0.97  # the sum of squares in another order
    torch.testing.assert_close(out.float(), want_out.float(), rtol=2e-3, atol=2e-3)
    used = rows * n // 2
    for p in range(world):
        slots = regions[p].view(2, world, slot)
        if p == rank:
            assert slots[seq % 2, :, :used].eq(0).all()  # read, then cleared
        else:
            assert torch.equal(slots[seq % 2, rank, :used], _words(xs[rank], seq))
            assert slots[1 - seq % 2].eq(0).all()  # the other parity untouched


def test_stale_words_are_waited_for_not_summed():
    """A peer's word still showing the previous call's flag is not this call's data: the rank
    waits for it (here past a short spin bound, which counts one timed-out wait)."""
    world, rank, rows, n, seq = 2, 0, 1, 64, 9
    xs, residual, w, slot, regions = _setup(world, rank, rows, n, seq, seed=3)
    stale = regions[rank].view(2, world, slot)[seq % 2, 1]
    stale[5] = (_flag(seq - 2) << 32) | (stale[5] & 0xFFFFFFFF)
    state = torch.tensor([seq - 1, 0], dtype=torch.int64)
    err = torch.zeros(1, dtype=torch.int32)
    out, res_out = torch.empty_like(residual), torch.empty_like(residual)
    _ll.launch_ll_all_reduce_add_rms_norm(xs[rank], residual, w, 1e-5, out, res_out, tuple(regions), state, err,
                                          rank, 3)
    assert int(err) == 1


def test_flag_is_never_zero_and_fits():
    assert _flag(2**31 - 2) == 2**31 - 1 and _flag(2**31 - 1) == 1 and _flag(0) == 1
    assert _ll.fits(16, 4096, 2) and not _ll.fits(17, 4096, 2)
    assert not _ll.fits(1, 4096, 4) and not _ll.fits(1, 4095, 2)
    with pytest.raises(ValueError, match="LL slots"):
        x = torch.zeros(1, 4095, dtype=torch.float16)
        _ll.launch_ll_all_reduce_add_rms_norm(x, x, x[0], 1e-5, x, x, (torch.zeros(8, dtype=torch.int64),) * 2,
                                              torch.zeros(2, dtype=torch.int64), torch.zeros(1, dtype=torch.int32),
                                              0, 1)


# --- init_custom_all_reduce's flow, ranks simulated by threads ------------------------------
# The collectives are a thread-level stand-in for NCCL and the kernel a synchronous torch
# stand-in (the real kernel is tested above): what runs for real is the start-up logic (the
# agreements, the agreed size limit, the buffer views, the self-test) that otherwise only runs
# on GPU machines.

class _ThreadWorld:
    """all_gather / all_reduce(MIN) across W threads, the subset of torch.distributed used."""

    class ReduceOp:
        MIN = "min"

    def __init__(self, world: int):
        import threading

        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list = [None] * world
        self.rank_of: dict = {}

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        import threading

        r = self.rank_of[threading.get_ident()]
        self.barrier.wait()
        self.slots[r] = t.clone()
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def all_gather(self, parts, t, group=None):
        for dst, src in zip(parts, self._exchange(t)):
            dst.copy_(src)

    def all_reduce(self, t, op=None, group=None):
        assert op == self.ReduceOp.MIN
        t.copy_(torch.stack(self._exchange(t)).min(0).values)


def _simulate_init(monkeypatch, world: int, env_per_rank=None, fail_self_test_rank=None):
    import threading

    tw = _ThreadWorld(world)
    data = _tar.data_bytes(world, BUFFER_BYTES)
    shared = [torch.zeros(car_mod.buffer_bytes(world), dtype=torch.uint8) for _ in range(world)]
    launches = []

    def fake_ll_launch(x, residual, weight, eps, out, res_out, ll_bufs, state, err, rank, max_spin):
        # The LL kernel's sums, synchronously (its norm is tested above): through the LL regions.
        n = x.numel()
        assert ll_bufs[rank].dtype == torch.int64
        ll_bufs[rank][:n].copy_(x.flatten().to(torch.int64))  # small integers: exact
        tw.barrier.wait()
        acc = sum(b[:n].double() for b in ll_bufs)
        tw.barrier.wait()
        res_out.copy_((acc.to(x.dtype).view_as(x).float() + residual.float()).to(x.dtype))
        out.copy_(res_out)
        launches.append((rank, ("ll", tuple(x.shape)), max_spin))

    def fake_launch(x, out, bufs, flag_addrs, state, err, rank, max_spin):
        # What one kernel launch does, synchronously: publish, barrier, sum in rank order, barrier.
        assert [int(a) for a in flag_addrs] == [b.data_ptr() + data for b in shared]
        assert state.dtype == torch.int64 and state.numel() == 2
        assert all(b.data_ptr() == s.data_ptr() for b, s in zip(bufs, shared))
        n = x.numel()
        bufs[rank][:n].copy_(x.flatten())
        tw.barrier.wait()
        acc = torch.zeros(n, dtype=torch.float32)
        for b in bufs:
            acc += b[:n].float()
        if rank == fail_self_test_rank:
            acc += 1
        tw.barrier.wait()
        out.copy_(acc.to(out.dtype).view_as(out))
        launches.append((rank, n, max_spin))

    monkeypatch.setattr(car_mod, "dist", tw)
    monkeypatch.setattr(car_mod, "_eligible", lambda device_type, ws: True)
    real_reason = car_mod.unsupported_reason
    monkeypatch.setattr(car_mod, "unsupported_reason", lambda device_type, ws: real_reason("cuda", ws))
    monkeypatch.setattr(car_mod, "topology_reason", lambda *a: None)
    monkeypatch.setattr(car_mod, "_nvlink_reason", lambda devices: None)
    monkeypatch.setattr(car_mod, "_symmetric_buffer", lambda nbytes, group, rank, ws, device: (object(), tuple(shared), 0))
    monkeypatch.setattr(car_mod, "_precompile", lambda car: None)
    monkeypatch.setattr(_tar, "launch_one_shot", fake_launch)
    from distllm.ops import triton_all_reduce_ll as _ll

    monkeypatch.setattr(_ll, "launch_ll_all_reduce_add_rms_norm", fake_ll_launch)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    env_per_rank = env_per_rank or [{}] * world
    results: list = [None] * world
    errors: list = []

    def run(rank: int) -> None:
        tw.rank_of[threading.get_ident()] = rank
        try:
            results[rank] = init_custom_all_reduce(None, rank, world, torch.device("cpu"))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            tw.barrier.abort()

    with monkeypatch.context() as m:
        # os.environ is per process: hand each thread its own view through max_bytes_for.
        real = car_mod.max_bytes_for
        m.setattr(car_mod, "max_bytes_for", lambda ws, env=None: real(ws, {**os.environ, **env_per_rank[tw.rank_of[threading.get_ident()]]}))
        real_ll = car_mod.ll_requested
        m.setattr(car_mod, "ll_requested",
                  lambda env=None: real_ll({**os.environ, **env_per_rank[tw.rank_of[threading.get_ident()]]}))
        threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not errors, errors
    return results, launches


@pytest.mark.parametrize("world", [2, 4])
def test_init_flow_comes_up_on_every_rank(monkeypatch, world):
    monkeypatch.delenv(ENV_MAX_BYTES, raising=False)
    cars, launches = _simulate_init(monkeypatch, world)
    assert all(c is not None for c in cars)
    assert [c.rank for c in cars] == list(range(world))
    assert all(c.max_bytes == DEFAULT_MAX_BYTES[world] for c in cars)
    assert all(c.max_spin == car_mod.ENGINE_MAX_SPIN for c in cars)  # the short bound was for the test
    sizes = sorted({n for _, n, _ in launches})
    assert sizes == sorted({1, 4099, DEFAULT_MAX_BYTES[world] // 2})
    assert not any(c.use_ll for c in cars)  # off unless asked for
    assert all(spin == car_mod.SELF_TEST_MAX_SPIN for _, _, spin in launches)


def test_init_flow_agrees_on_the_smallest_size_limit(monkeypatch):
    cars, _ = _simulate_init(monkeypatch, 2, env_per_rank=[{ENV_MAX_BYTES: "65536"}, {ENV_MAX_BYTES: "8192"}])
    assert [c.max_bytes for c in cars] == [8192, 8192]


def test_init_flow_ll_when_every_rank_asks(monkeypatch):
    """DISTLLM_ALL_REDUCE_LL=1 on every rank: the LL kernel is on everywhere, after its own
    self-test (exact sums in the residual output, two rounds of two shapes, after the flag
    kernel's); on some ranks only: off everywhere, the flag kernel for all."""
    from distllm.distributed.custom_all_reduce import ENV_LL

    cars, launches = _simulate_init(monkeypatch, 2, env_per_rank=[{ENV_LL: "1"}, {ENV_LL: "1"}])
    assert [c.use_ll for c in cars] == [True, True]
    ll_calls = [n for _, n, _ in launches if isinstance(n, tuple)]
    assert sorted(ll_calls) == sorted([("ll", (1, 4096)), ("ll", (3, 576))] * 4)  # two ranks, two rounds
    cars, launches = _simulate_init(monkeypatch, 2, env_per_rank=[{ENV_LL: "1"}, {}])
    assert [c.use_ll for c in cars] == [False, False]
    assert not any(isinstance(n, tuple) for _, n, _ in launches)


def test_init_flow_one_rank_disabled_turns_all_off(monkeypatch):
    cars, launches = _simulate_init(monkeypatch, 2, env_per_rank=[{}, {ENV_MAX_BYTES: "0"}])
    assert cars == [None, None] and launches == []


def test_init_flow_failed_self_test_turns_all_off(monkeypatch):
    cars, launches = _simulate_init(monkeypatch, 4, fail_self_test_rank=2)
    assert cars == [None] * 4 and launches  # the test ran, rank 2 got wrong sums, nobody uses it
