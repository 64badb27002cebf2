"""The transport's shared-memory fast path: the ring itself, and the channels over it."""

from __future__ import annotations

import logging
import os
import stat
import struct
import threading
import time

import msgpack
import pytest

from distllm.distributed import shm_ring, transport
from distllm.distributed.shm_ring import EMPTY, LAPPED, TORN, ShmRing, create_ring
from distllm.distributed.transport import DriverChannel, TransportConfig, WorkerChannel

LOGGER = "distllm.transport"


@pytest.fixture(autouse=True)
def _shm_on(monkeypatch):
    monkeypatch.delenv("DISTLLM_SHM_TRANSPORT", raising=False)


def _frame(i: int, n: int = 10) -> tuple[bytes, bytes, bytes]:
    return msgpack.packb(["plan", i, -1, i]), bytes([i % 256]) * n, bytes([255 - i % 256]) * 32


# ---- the ring ----------------------------------------------------------------------------


def test_ring_round_trip_and_wraparound(tmp_path):
    path = str(tmp_path / "r")
    create_ring(path, nslots=4, slot_size=256)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    w, r = ShmRing(path, writable=True), ShmRing(path)
    try:
        assert (r.nslots, r.slot_size, r.max_frame) == (4, 256, 256 - 24)
        assert r.read(1) == EMPTY  # a fresh ring holds nothing
        for seq in range(1, 12):
            assert r.read(seq) == EMPTY
            assert w.write(seq, *_frame(seq, n=seq * 10))
            assert r.read(seq) == list(_frame(seq, n=seq * 10))
        assert r.read(12) == EMPTY  # slot 0 holds seq 8: not written yet
        assert r.read(7) == LAPPED  # slot 3 holds seq 11
        assert r.read(9) == list(_frame(9, n=90))  # still in its slot
        assert w.write(12, b"h", b"", b"m") and r.read(12) == [b"h", b"", b"m"]
        # A frame that does not fit a slot is not written, and the slot keeps what it had.
        assert not w.write(13, b"h", b"x" * 300, b"m")
        assert r.read(13) == EMPTY and r.read(9) == list(_frame(9, n=90))
    finally:
        w.close()
        r.close()


def test_ring_torn_slot_and_bad_files(tmp_path):
    path = str(tmp_path / "r")
    create_ring(path, nslots=2, slot_size=128)
    w, r = ShmRing(path, writable=True), ShmRing(path)
    try:
        w.write(3, *_frame(3))
        struct.pack_into("<I", w._mm, 64 + 128 + 8, 10_000)  # header length past the slot
        assert r.read(3) == TORN
        struct.pack_into("<Q", w._mm, 64 + 128, 0)  # a write in progress
        assert r.read(3) == EMPTY
        with pytest.raises(FileExistsError):
            create_ring(path)
    finally:
        w.close()
        r.close()
    bad = tmp_path / "bad"
    bad.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError):
        ShmRing(str(bad))
    with pytest.raises(ValueError):
        create_ring(str(tmp_path / "tiny"), nslots=0)


def test_ack_board(tmp_path):
    path = str(tmp_path / "acks")
    shm_ring.create_ack_board(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    a, b = shm_ring.AckBoard(path), shm_ring.AckBoard(path)  # a reader and a writer, say
    try:
        assert all(b.acked(i) == 0 and not b.asleep(i) for i in range(shm_ring.ACK_SLOTS))
        a.set_acked(3, 2**63 + 5)
        a.set_asleep(shm_ring.ACK_DRIVER_SLOT, True)
        assert b.acked(3) == 2**63 + 5 and b.acked(2) == b.acked(4) == 0
        assert b.asleep(shm_ring.ACK_DRIVER_SLOT) and not b.asleep(3)
        a.set_asleep(shm_ring.ACK_DRIVER_SLOT, False)
        assert not b.asleep(shm_ring.ACK_DRIVER_SLOT)
        with pytest.raises(FileExistsError):
            shm_ring.create_ack_board(path)
    finally:
        a.close()
        b.close()
    a.close()  # twice is fine
    bad = tmp_path / "bad"
    bad.write_bytes(b"x" * 100)
    with pytest.raises(ValueError):
        shm_ring.AckBoard(str(bad))


# ---- the channels over it -----------------------------------------------------------------


# A driver and n workers in this process, handshake done (tests/cpu is on sys.path under
# pytest's default import mode, as for every test module here).
from test_transport import Setup  # noqa: E402


def _round_trips(s: Setup, steps, payload=lambda step: b"plan %d" % step) -> None:
    for step in steps:
        s.driver.send_plan(step, payload(step))
        for w in s.workers:
            assert w.recv_plan(timeout_s=5) == (step, payload(step))
        s.workers[0].send_result(step, b"result %d" % step)
        assert s.driver.recv_result(timeout_s=5) == (step, b"result %d" % step)


def _drained(s: Setup) -> None:
    """Nothing more comes on either side; any ZeroMQ copies were dropped silently."""
    for w in s.workers:
        assert w.recv_plan(timeout_s=0.05) is None
        assert w.num_dropped == 0
    assert s.driver.recv_result(timeout_s=0.05) is None
    assert s.driver.num_dropped == 0
    for w in s.workers:  # copies that were sent late came, and went, without a trace
        assert w.recv_plan(timeout_s=0.05) is None
        assert w.num_dropped == 0


@pytest.fixture
def copies_wait(monkeypatch):
    """Copies wait for acks far longer than any test: only a sleeping reader gets one."""
    monkeypatch.setattr(transport, "COPY_DELAY_S", 10.0)


@pytest.fixture
def copies_at_once(monkeypatch):
    """Every hot frame's ZeroMQ copy is sent when the frame is (as with no acks at all)."""
    monkeypatch.setattr(transport, "COPY_DELAY_S", 0.0)


def test_frames_come_through_shm_in_order(caplog, copies_wait):
    s = Setup("ipc")
    try:
        cfg = s.cfg
        assert cfg.plan_ring and cfg.result_ring and cfg.ack_board
        # Every rank mapped its rings before it acked the handshake: the files are gone now,
        # so an engine killed from here on leaves no shared memory behind.
        for path in (cfg.plan_ring, cfg.result_ring, cfg.ack_board, cfg.shm_dir):
            assert not os.path.exists(path)
        assert s.driver._copy_readers == [0, 1] and s.workers[0]._copy_readers == [shm_ring.ACK_DRIVER_SLOT]
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            for step in range(1, 301):
                _round_trips(s, [step])
            _drained(s)
        assert not [r for r in caplog.records if r.name == LOGGER]
        # The frame is in the ring before recv is called, and the ring is read first.
        assert all(w.shm_taken >= 300 for w in s.workers) and s.driver.shm_taken == 300  # (+ late syncs)
        # Every reader acked every hot frame before anyone slept: no ZeroMQ copy was sent.
        for end in (s.driver, s.workers[0]):
            assert end.copies_sent == 0 and end.copies_skipped == 300
    finally:
        s.close()
    assert not os.path.exists(s.cfg.shm_dir) and not os.path.exists(s.cfg.ipc_dir)


def test_copies_sent_at_once_are_drained_silently(caplog, copies_at_once):
    s = Setup("ipc")
    try:
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            for step in range(1, 101):
                _round_trips(s, [step])
            _drained(s)
        assert not [r for r in caplog.records if r.name == LOGGER]
        assert all(w.shm_taken > 0 for w in s.workers)
        assert s.driver.copies_sent + s.driver.copies_skipped == 100
    finally:
        s.close()


def _asleep_worker(s: Setup) -> tuple[threading.Thread, list]:
    """Worker 0 receiving in a thread, past its spin: asleep in poll, and marked so."""
    _round_trips(s, [1])
    w = s.workers[0]
    got: list = []
    t = threading.Thread(target=lambda: got.append(w.recv_plan(timeout_s=10)))
    t.start()
    time.sleep(0.2)
    return t, got


def test_sleeping_reader_gets_the_copy_at_once(copies_wait):
    s = Setup("ipc", n=1)
    try:
        t, got = _asleep_worker(s)
        s.driver.send_plan(2, b"plan 2")
        t.join(5)
        assert got == [(2, b"plan 2")]
        assert s.driver.copies_sent == 1  # sent at once, not 10 s later
    finally:
        s.close()


def test_reader_asleep_finds_a_frame_whose_copy_was_skipped(monkeypatch, copies_wait):
    """A writer that reads the asleep mark just before it is set skips the copy: the reader
    still finds the frame in the ring when its capped poll() ends."""
    s = Setup("ipc", n=1)
    try:
        t, got = _asleep_worker(s)
        monkeypatch.setattr(s.driver._acks, "asleep", lambda slot: False)  # the mark is missed
        t0 = time.monotonic()
        s.driver.send_plan(2, b"plan 2")
        t.join(5)
        assert got == [(2, b"plan 2")] and time.monotonic() - t0 < 2.0
        assert s.driver.copies_sent == 0
    finally:
        s.close()


def test_copy_waits_at_most_the_delay(monkeypatch):
    monkeypatch.setattr(transport, "COPY_DELAY_S", 0.05)
    s = Setup("ipc", n=1)
    try:
        _round_trips(s, [1])
        s.driver.send_plan(2, b"plan 2")  # the worker is busy elsewhere: it acks nothing
        assert s.driver.copies_sent == 0
        assert s.driver.recv_result(timeout_s=0.2) is None  # the wait sends the copy when due
        assert s.driver.copies_sent == 1
        w = s.workers[0]
        assert w.recv_plan(timeout_s=5) == (2, b"plan 2")
        w.send_result(2, b"result 2")
        assert s.driver.recv_result(timeout_s=5) == (2, b"result 2")
        _drained(s)
    finally:
        s.close()


def test_reader_without_acks_gets_every_copy(monkeypatch, copies_wait):
    """A rank that cannot map the ack file never acks: the driver then sends every plan's copy
    at once rather than letting it wait."""
    real = transport._Endpoint._open_acks

    def no_acks_for_workers(self, path):
        return None if isinstance(self, WorkerChannel) else real(self, path)

    monkeypatch.setattr(transport._Endpoint, "_open_acks", no_acks_for_workers)
    s = Setup("ipc", n=2)
    try:
        assert s.driver._copy_readers is None and s.workers[0]._copy_readers is None
        for step in range(1, 11):
            s.driver.send_plan(step, b"plan %d" % step)
            for w in s.workers:
                assert w.recv_plan(timeout_s=5) == (step, b"plan %d" % step)
            s.workers[0].send_result(step, b"result %d" % step)
            assert s.driver.recv_result(timeout_s=5) == (step, b"result %d" % step)
        _drained(s)
        assert s.driver.copies_sent == s.driver.copies_skipped == 0  # nothing waited
    finally:
        s.close()


def test_lapped_reader_falls_back_to_zmq(copies_wait):
    s = Setup("ipc", n=2)
    try:
        nslots = shm_ring.NUM_SLOTS
        for step in range(1, 2 * nslots + 9):  # the ring laps the idle workers twice
            s.driver.send_plan(step, b"plan %d" % step)
        for w in s.workers:
            got = [w.recv_plan(timeout_s=5) for _ in range(2 * nslots + 8)]
            assert got == [(step, b"plan %d" % step) for step in range(1, 2 * nslots + 9)]
            # The first ones were overwritten: taken from ZeroMQ, where the driver sent each
            # frame's copy as its slot was taken (waiting for acks no more).
            assert w.shm_missed >= 1 and w.shm_taken >= nslots
        _round_trips(s, range(100, 110))  # and the fast path picks up again
        _drained(s)
    finally:
        s.close()


def _slot_offset(ring: ShmRing, seq: int) -> int:
    return 64 + (seq % ring.nslots) * ring.slot_size


def test_torn_or_tampered_shm_slot_is_not_accepted(caplog, copies_at_once):
    s = Setup("ipc", n=1)
    w = s.workers[0]
    evil = s.driver._ring_out  # the same mapping as anything that can write the file
    try:
        _round_trips(s, [1])
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            # A slot changed after it was written (a torn read looks the same): the MAC fails,
            # so the worker takes the ZeroMQ copy, silently.
            s.driver.send_plan(2, b"plan 2")
            seq = s.driver._seq
            valid = evil.read(seq)
            off = _slot_offset(evil, seq)
            hl = struct.unpack_from("<I", evil._mm, off + 8)[0]
            evil._mm[off + 24 + hl] ^= 0x01
            missed = w.shm_missed
            assert w.recv_plan(timeout_s=5) == (2, b"plan 2")
            assert w.shm_missed == missed + 1 and w.num_dropped == 0
            # A signed frame in the wrong slot (a replay through shm) is not taken either.
            s.driver.send_plan(3, b"plan 3")
            assert evil.write(seq + 1, *valid)
            assert w.recv_plan(timeout_s=5) == (3, b"plan 3")
            assert w.shm_missed == missed + 2 and w.num_dropped == 0
            _drained(s)
        assert not [r for r in caplog.records if r.name == LOGGER]
        # Both copies tampered: the shm one is skipped silently, the ZeroMQ one is dropped
        # and logged as always, and the next plan still comes.
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            header, payload, mac = s.driver._frames("plan", 4, b"plan 4", -1)
            bad = bytes([payload[0] ^ 0x20]) + payload[1:]
            assert s.driver._ring_out.write(s.driver._seq, header, bad, mac)
            s.driver._pub.send_multipart([header, bad, mac])
            s.driver.send_plan(5, b"plan 5")
            assert w.recv_plan(timeout_s=5) == (5, b"plan 5")
            assert w.recv_plan(timeout_s=0.05) is None
        assert w.num_dropped == 1
        drops = [r for r in caplog.records if r.name == LOGGER]
        assert len(drops) == 1 and "bad HMAC" in drops[0].message
    finally:
        s.close()


def test_frames_larger_than_a_slot_go_by_zmq():
    s = Setup("ipc", n=2)
    try:
        big = shm_ring.SLOT_SIZE + 1000
        sizes = {1: 10, 2: big, 3: 10, 4: big, 5: big, 6: 10}
        payload = lambda step: bytes([step]) * sizes[step]  # noqa: E731
        for step in sizes:  # each in turn, and then all queued at once
            _round_trips(s, [step], payload)
        for step in sizes:
            s.driver.send_plan(step + 10, payload(step))
        for w in s.workers:
            assert [w.recv_plan(timeout_s=5) for _ in sizes] == [(step + 10, payload(step)) for step in sizes]
        big_result = b"r" * big
        s.workers[0].send_result(7, big_result)
        s.workers[0].send_result(8, b"small")
        assert s.driver.recv_result(timeout_s=5) == (7, big_result)
        assert s.driver.recv_result(timeout_s=5) == (8, b"small")
        _drained(s)
    finally:
        s.close()


def test_shm_off_by_env(monkeypatch):
    monkeypatch.setenv("DISTLLM_SHM_TRANSPORT", "0")
    s = Setup("ipc", n=1)
    try:
        assert s.cfg.shm_dir is None and s.cfg.plan_ring is None and s.cfg.result_ring is None
        assert s.driver._ring_out is None and s.workers[0]._ring_in is None
        _round_trips(s, range(1, 6))
        _drained(s)
        assert s.workers[0].shm_taken == 0 and s.driver.shm_taken == 0
    finally:
        s.close()
    # Rings made (the driver had it on), but a channel whose process has it off ignores them.
    monkeypatch.delenv("DISTLLM_SHM_TRANSPORT")
    cfg = TransportConfig.create("ipc")
    try:
        assert cfg.plan_ring is not None
        off = TransportConfig.create("ipc", shm=False)
        off.cleanup()
        assert off.plan_ring is None and off.shm_dir is None
        monkeypatch.setenv("DISTLLM_SHM_TRANSPORT", "off")
        d = DriverChannel(cfg)
        w = WorkerChannel(cfg, 0)
        assert d._ring_out is None and d._ring_in is None and w._ring_in is None and w._ring_out is None
        w.close()
        d.close()
    finally:
        cfg.cleanup()


def test_two_engines_do_not_collide():
    a, b = Setup("ipc", n=1), Setup("ipc", n=1)
    try:
        assert a.cfg.shm_dir != b.cfg.shm_dir
        assert len({a.cfg.plan_ring, a.cfg.result_ring, b.cfg.plan_ring, b.cfg.result_ring}) == 4
        for step in range(1, 21):  # interleaved
            for s, name in ((a, b"a"), (b, b"b")):
                s.driver.send_plan(step, name + b"%d" % step)
            for s, name in ((a, b"a"), (b, b"b")):
                assert s.workers[0].recv_plan(timeout_s=5) == (step, name + b"%d" % step)
                s.workers[0].send_result(step, name)
            for s, name in ((a, b"a"), (b, b"b")):
                assert s.driver.recv_result(timeout_s=5) == (step, name)
        _drained(a)
        _drained(b)
        assert a.workers[0].shm_taken > 0 and b.workers[0].shm_taken > 0
    finally:
        a.close()
        b.close()
    for s in (a, b):
        assert not os.path.exists(s.cfg.shm_dir)


def test_config_travels_and_cleans_up():
    cfg = TransportConfig.create("ipc")
    assert os.path.dirname(cfg.plan_ring) == cfg.shm_dir == os.path.dirname(cfg.result_ring)
    assert stat.S_IMODE(os.stat(cfg.shm_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(cfg.plan_ring).st_mode) == 0o600
    if os.access("/dev/shm", os.W_OK):
        assert cfg.shm_dir.startswith("/dev/shm/")
    wire = msgpack.unpackb(msgpack.packb(cfg.to_dict()), raw=False)
    back = TransportConfig.from_dict(wire)
    assert (back.shm_dir, back.plan_ring, back.result_ring, back.ack_board) == (
        cfg.shm_dir, cfg.plan_ring, cfg.result_ring, cfg.ack_board)
    assert os.path.dirname(cfg.ack_board) == cfg.shm_dir and stat.S_IMODE(os.stat(cfg.ack_board).st_mode) == 0o600
    # A config from before the fast path (no shm keys) still loads: ZeroMQ only.
    old = {k: v for k, v in wire.items() if k not in ("shm_dir", "plan_ring", "result_ring")}
    assert TransportConfig.from_dict(old).plan_ring is None
    assert os.path.isfile(cfg.plan_ring) and os.path.isfile(cfg.result_ring)
    cfg.cleanup()  # without a handshake (a failed start): cleanup() removes them
    assert not os.path.exists(cfg.shm_dir) and not os.path.exists(cfg.ipc_dir)
    tcp = TransportConfig.create("tcp")
    assert tcp.shm_dir is None and tcp.plan_ring is None and tcp.result_ring is None
