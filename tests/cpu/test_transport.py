"""The driver <-> worker ZeroMQ transport: round trips, handshake, signing, replay, isolation."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import secrets
import threading
import time

import msgpack
import pytest
import zmq

from distllm.core.plan import (
    CachedRequestData,
    NewRequestData,
    RequestResult,
    StepPlan,
    StepResult,
    TokenLogprobs,
    decode_plan,
    decode_result,
    encode_plan,
    encode_result,
)
from distllm.distributed import transport
from distllm.distributed.transport import (
    _Mac,
    DriverChannel,
    ShutdownRequested,
    TransportConfig,
    WorkerChannel,
    WorkerError,
    make_frames,
    sign,
)

LOGGER = "distllm.transport"


def _plan(step_id: int) -> StepPlan:
    return StepPlan(
        step_id=step_id,
        new_requests=[
            NewRequestData(
                f"new-{step_id}", [1, 2, 3, 4], [], [7, 8], 0, {"temperature": 0.5, "seed": 3, "stop_token_ids": [2]}
            )
        ],
        cached_requests=[CachedRequestData("old-0", [42], [9]), CachedRequestData("old-1", [43], [])],
        num_scheduled_tokens={f"new-{step_id}": 4, "old-0": 1, "old-1": 1},
        finished_req_ids=["gone"],
        preempted_req_ids=["pre"],
    )


def _result(step_id: int) -> StepResult:
    return StepResult(
        step_id=step_id,
        results=[
            RequestResult(f"new-{step_id}", [11], TokenLogprobs([[11, 5]], [[-0.5, -1.25]], [1])),
            RequestResult("old-0", [12]),
            RequestResult("old-1", []),
        ],
        errors=[],
    )


class Setup:
    def __init__(self, mode: str, n: int = 2):
        self.cfg = TransportConfig.create(mode)
        self.driver = DriverChannel(self.cfg)
        # The config goes to the workers as a msgpack-able dict (as the executors hand it over).
        wire = msgpack.unpackb(msgpack.packb(self.cfg.to_dict()), raw=False)
        self.workers = [WorkerChannel(TransportConfig.from_dict(wire), r) for r in range(n)]
        ts = [threading.Thread(target=w.handshake, args=(10,)) for w in self.workers]
        for t in ts:
            t.start()
        self.driver.wait_for_workers(n, timeout_s=10)
        for t in ts:
            t.join()
        assert all(w.synced for w in self.workers)

    def close(self):
        for w in self.workers:
            w.close()
        self.driver.close()
        self.cfg.cleanup()


@pytest.fixture
def ipc():
    s = Setup("ipc")
    yield s
    s.close()


@pytest.mark.parametrize("mode", ["ipc", "tcp"])
def test_round_trip(mode):
    s = Setup(mode)
    try:
        if mode == "ipc":
            assert s.cfg.plan_addr.startswith("ipc://") and os.path.isdir(s.cfg.ipc_dir)
        else:
            assert s.cfg.plan_addr.startswith("tcp://127.0.0.1:")
        for step in range(1, 4):
            plan = _plan(step)
            s.driver.send_plan(step, encode_plan(plan))
            for w in s.workers:  # every subscriber gets every plan
                got = w.recv_plan(timeout_s=5)
                assert got is not None
                assert got[0] == step
                assert decode_plan(got[1]) == plan
            s.workers[0].send_result(step, encode_result(_result(step)))
            got = s.driver.recv_result(timeout_s=5)
            assert got is not None and got[0] == step
            assert decode_result(got[1]) == _result(step)
        assert s.driver.num_dropped == 0 and all(w.num_dropped == 0 for w in s.workers)
    finally:
        s.close()
    if mode == "ipc":
        assert not os.path.exists(s.cfg.ipc_dir)


def test_error_frames_and_shutdown(ipc):
    ipc.workers[1].send_error("CUDA out of memory", step_id=7)
    with pytest.raises(WorkerError) as ei:
        ipc.driver.recv_result(timeout_s=5)
    assert ei.value.rank == 1 and ei.value.message == "CUDA out of memory" and ei.value.step_id == 7
    ipc.driver.send_shutdown()
    for w in ipc.workers:
        with pytest.raises(ShutdownRequested):
            w.recv_plan(timeout_s=5)


def test_recv_timeout_returns_none_promptly(ipc):
    for fn in (ipc.driver.recv_result, ipc.workers[0].recv_plan):
        t0 = time.monotonic()
        assert fn(timeout_s=0.1) is None
        assert 0.09 <= time.monotonic() - t0 < 0.6
        t0 = time.monotonic()
        assert fn(timeout_s=0) is None
        assert time.monotonic() - t0 < 0.1


def _late_worker(cfg_dict, rank, n_steps, delay, out):
    time.sleep(delay)
    w = WorkerChannel(TransportConfig.from_dict(cfg_dict), rank)
    got = []
    try:
        while len(got) < n_steps:
            r = w.recv_plan(timeout_s=10)
            if r is None:
                break
            got.append(r[0])
    finally:
        w.close()
    out[rank] = got


@pytest.mark.parametrize("mode", ["ipc", "tcp"])
def test_handshake_loses_no_plan(mode):
    """Workers join late and only call recv_plan; plans sent right after the handshake all arrive."""
    cfg = TransportConfig.create(mode)
    d = DriverChannel(cfg)
    out: dict[int, list[int]] = {}
    ts = [threading.Thread(target=_late_worker, args=(cfg.to_dict(), r, 30, 0.05 * (r + 1), out)) for r in range(2)]
    try:
        for t in ts:
            t.start()
        d.wait_for_workers(2, timeout_s=10)
        for step in range(1, 31):
            d.send_plan(step, encode_plan(_plan(step)))
        for t in ts:
            t.join(15)
        assert out == {0: list(range(1, 31)), 1: list(range(1, 31))}
    finally:
        d.close()
        cfg.cleanup()


def test_handshake_times_out():
    cfg = TransportConfig.create("ipc")
    d = DriverChannel(cfg)
    w = WorkerChannel(cfg, 0)  # connected, but never reads its SUB: never acks
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="ready ranks"):
            d.wait_for_workers(1, timeout_s=0.3)
        assert time.monotonic() - t0 < 2
        assert d.ready_ranks == {0} and d.acked_ranks == set()
    finally:
        w.close()
        d.close()
        cfg.cleanup()


@pytest.mark.parametrize("key_len", [16, 32, 64, 65, 200])
def test_precomputed_hmac_is_hmac_sha256(key_len):
    key = secrets.token_bytes(key_len)
    mac = _Mac(key)
    for n in (0, 1, 63, 64, 65, 3000):
        header, payload = msgpack.packb(["plan", n, -1, 7]), os.urandom(n)
        assert mac(header, payload) == sign(key, header, payload)


def test_frames_interoperate_with_make_frames(ipc):
    """The endpoints' MAC is plain HMAC-SHA256: frames made by make_frames are accepted."""
    w = ipc.workers[0]
    frames = make_frames(ipc.cfg.hmac_key, "plan", ipc.driver._seq + 1, -1, 3, b"payload")
    ipc.driver._pub.send_multipart(frames)
    assert w.recv_plan(timeout_s=5) == (3, b"payload")
    assert w.num_dropped == 0


# ---- hostile frames ----------------------------------------------------------------------


class _Evil:
    """Unpickling this creates the marker file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _bad_plan_frames(s: Setup, attack: str, sent: list, marker: str) -> list[bytes]:
    key = s.cfg.hmac_key
    nxt = s.driver._seq + 1
    if attack == "tampered":
        # Signed as the driver's next frame would be (without taking the driver's seq: a frame
        # it never sends would leave a gap its shm readers wait on), then one bit flipped.
        frames = make_frames(key, "plan", nxt, -1, 99, encode_plan(_plan(99)))
        p = bytearray(frames[1])
        p[len(p) // 2] ^= 0x01
        return [frames[0], bytes(p), frames[2]]
    if attack == "replayed":
        return list(sent[0])  # the step-1 plan, exactly as sent (valid MAC)
    if attack == "other_key":
        return make_frames(secrets.token_bytes(32), "plan", nxt, -1, 99, encode_plan(_plan(99)))
    if attack == "unknown_kind":
        return make_frames(key, "boom", nxt, -1, 99, encode_plan(_plan(99)))
    if attack == "wrong_sender":
        return make_frames(key, "plan", nxt, 0, 99, encode_plan(_plan(99)))
    if attack == "pickle_raw":
        return [pickle.dumps(_Evil(marker))]
    if attack == "pickle_framed":
        evil = pickle.dumps(_Evil(marker))
        return [msgpack.packb(["plan", nxt, -1, 99]), evil, b"\0" * 32]
    raise AssertionError(attack)


ATTACKS = ["tampered", "replayed", "other_key", "unknown_kind", "wrong_sender", "pickle_raw", "pickle_framed"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_bad_plan_frames_are_dropped(ipc, attack, caplog, tmp_path, monkeypatch):
    if attack == "replayed":
        # A replay is logged when it can be told from a late copy of a frame taken from shm,
        # i.e. when that copy was sent (and drained) first: send every copy at once.
        monkeypatch.setattr(transport, "COPY_DELAY_S", 0.0)
    marker = str(tmp_path / "pwned")
    sent: list = []
    orig = ipc.driver._frames

    def record(*a):
        f = orig(*a)
        sent.append(f)
        return f

    ipc.driver._frames = record
    ipc.driver.send_plan(1, encode_plan(_plan(1)))
    for w in ipc.workers:
        assert w.recv_plan(timeout_s=5)[0] == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ipc.driver._pub.send_multipart(_bad_plan_frames(ipc, attack, sent, marker))
        ipc.driver.send_plan(2, encode_plan(_plan(2)))
        for w in ipc.workers:
            got = w.recv_plan(timeout_s=5)
            assert got is not None and got[0] == 2 and decode_plan(got[1]) == _plan(2)
            # Plan 2's shm copy may be taken before the bad frame comes on ZeroMQ: drain first.
            assert w.recv_plan(timeout_s=0.02) is None
            assert w.num_dropped == 1
    drops = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING and "dropped" in r.message]
    assert len(drops) == 2, [r.message for r in caplog.records]  # one per worker
    assert not os.path.exists(marker)


RESULT_ATTACKS = ["tampered", "replayed", "other_key", "pickle_raw", "pickle_framed", "driver_sender"]


@pytest.mark.parametrize("attack", RESULT_ATTACKS)
def test_bad_result_frames_are_dropped(ipc, attack, caplog, tmp_path, monkeypatch):
    if attack == "replayed":
        # A replay is logged when it can be told from a late copy of a frame taken from shm,
        # i.e. when that copy was sent (and drained) first: send every copy at once.
        monkeypatch.setattr(transport, "COPY_DELAY_S", 0.0)
    marker = str(tmp_path / "pwned")
    key = ipc.cfg.hmac_key
    w0 = ipc.workers[0]
    sent: list = []
    orig = w0._frames

    def record(*a):
        f = orig(*a)
        sent.append(f)
        return f

    w0._frames = record
    w0.send_result(1, encode_result(_result(1)))
    assert ipc.driver.recv_result(timeout_s=5)[0] == 1
    nxt = w0._seq + 1
    payload = encode_result(_result(99))
    if attack == "tampered":
        f = make_frames(key, "res", nxt, 0, 99, payload)
        bad = [f[0], f[1][:-1] + bytes([f[1][-1] ^ 0x80]), f[2]]
    elif attack == "replayed":
        bad = list(sent[0])
    elif attack == "other_key":
        bad = make_frames(secrets.token_bytes(32), "res", nxt, 0, 99, payload)
    elif attack == "pickle_raw":
        bad = [pickle.dumps(_Evil(marker))]
    elif attack == "pickle_framed":
        bad = [msgpack.packb(["res", nxt, 0, 99]), pickle.dumps(_Evil(marker)), b"x" * 32]
    else:  # a worker-bound kind / the driver's sender id on the result path
        bad = make_frames(key, "plan", nxt, -1, 99, payload)
    # An outside peer connecting to the result socket (PULL accepts any connection).
    ctx = zmq.Context()
    attacker = ctx.socket(zmq.PUSH)
    attacker.setsockopt(zmq.LINGER, 1000)
    attacker.connect(ipc.cfg.result_addr)
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            attacker.send_multipart(bad)
            time.sleep(0.05)
            w0.send_result(2, encode_result(_result(2)))
            got = ipc.driver.recv_result(timeout_s=5)
            assert got is not None and got[0] == 2 and decode_result(got[1]) == _result(2)
            assert ipc.driver.recv_result(timeout_s=0.1) is None  # drains the bad one if fair-queued later
        assert ipc.driver.num_dropped == 1
        drops = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
        assert len(drops) == 1 and "dropped" in drops[0].message
        assert not os.path.exists(marker)
    finally:
        attacker.close(0)
        ctx.term()


def test_signed_pickle_is_never_unpickled(ipc, tmp_path):
    """Even an authenticated payload is raw bytes: plan.py decodes msgpack, never pickle."""
    marker = str(tmp_path / "pwned")
    ipc.driver.send_plan(5, pickle.dumps(_Evil(marker)))
    got = ipc.workers[0].recv_plan(timeout_s=5)
    assert got is not None and got[0] == 5
    with pytest.raises(Exception):
        decode_plan(got[1])
    assert not os.path.exists(marker)


# ---- isolation and binding ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ipc", "tcp"])
def test_two_engines_are_isolated(mode, caplog):
    a, b = Setup(mode, n=1), Setup(mode, n=1)
    try:
        assert a.cfg.plan_addr != b.cfg.plan_addr and a.cfg.result_addr != b.cfg.result_addr
        assert len({a.cfg.plan_addr, a.cfg.result_addr, b.cfg.plan_addr, b.cfg.result_addr}) == 4
        assert a.cfg.hmac_key != b.cfg.hmac_key
        if mode == "ipc":
            assert a.cfg.ipc_dir != b.cfg.ipc_dir
        a.driver.send_plan(1, b"engine-a")
        b.driver.send_plan(1, b"engine-b")
        assert a.workers[0].recv_plan(5) == (1, b"engine-a")
        assert b.workers[0].recv_plan(5) == (1, b"engine-b")
        assert a.workers[0].recv_plan(0.05) is None and b.workers[0].recv_plan(0.05) is None
        # Engine B's perfectly valid frame, delivered to engine A's workers, is dropped.
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            a.driver._pub.send_multipart(b.driver._frames("plan", 2, b"engine-b", -1))
            assert a.workers[0].recv_plan(0.2) is None
        assert a.workers[0].num_dropped == 1
        assert any("bad HMAC" in r.message for r in caplog.records)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "*", "::", "[::]", ""])
def test_tcp_refuses_wildcard_bind(host):
    with pytest.raises(ValueError):
        TransportConfig.create(mode="tcp", host=host)


def test_driver_refuses_wildcard_endpoint():
    for addr in ("tcp://0.0.0.0:0", "tcp://*:0"):
        cfg = TransportConfig(addr, "tcp://127.0.0.1:0", secrets.token_bytes(32))
        with pytest.raises(ValueError):
            DriverChannel(cfg)
    with pytest.raises(ValueError):
        TransportConfig.create(mode="udp")


def test_tcp_port_taken_falls_back_to_random_port():
    cfg = TransportConfig.create("tcp")
    d1 = DriverChannel(cfg)
    clash = TransportConfig(cfg.plan_addr, cfg.result_addr, secrets.token_bytes(32))
    d2 = DriverChannel(clash)  # both ports now in use: rebinds to random ones, config updated
    try:
        assert clash.plan_addr != cfg.plan_addr and clash.result_addr != cfg.result_addr
    finally:
        d2.close()
        d1.close()


# ---- a real worker process ---------------------------------------------------------------


def _process_worker(cfg_dict, rank):
    w = WorkerChannel(TransportConfig.from_dict(cfg_dict), rank)
    try:
        while True:
            got = w.recv_plan(timeout_s=20)
            if got is None:
                return
            plan = decode_plan(got[1])
            if rank == 0:
                results = [RequestResult(rid, [n]) for rid, n in plan.num_scheduled_tokens.items()]
                res = StepResult(plan.step_id, results)
                w.send_result(plan.step_id, encode_result(res))
    except ShutdownRequested:
        w.send_error(f"rank {rank} exiting")  # lets the test see both ranks got the shutdown
    finally:
        w.close()


def test_spawned_worker_processes():
    cfg = TransportConfig.create("ipc")
    d = DriverChannel(cfg)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_process_worker, args=(cfg.to_dict(), r), daemon=True) for r in range(2)]
    try:
        for p in procs:
            p.start()
        d.wait_for_workers(2, timeout_s=20)
        for step in range(1, 6):
            d.send_plan(step, encode_plan(_plan(step)))
            got = d.recv_result(timeout_s=10)
            assert got is not None and got[0] == step
            res = decode_result(got[1])
            assert [r.sampled_token_ids for r in res.results] == [[4], [1], [1]]
        d.send_shutdown()
        ranks = set()
        for _ in range(2):
            with pytest.raises(WorkerError) as ei:
                d.recv_result(timeout_s=10)
            ranks.add(ei.value.rank)
        assert ranks == {0, 1}
        for p in procs:
            p.join(10)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        d.close()
        cfg.cleanup()
