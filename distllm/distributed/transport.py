"""The driver <-> worker ZeroMQ transport (used by the ``mp`` and ``ray`` executors).

The driver PUBlishes every StepPlan to all tensor-parallel ranks and PULLs rank 0's StepResult
(and any rank's error report). Payloads are opaque bytes: the caller encodes/decodes them with
``distllm.core.plan``'s msgpack functions. Nothing here imports torch or pickle, and nothing is
ever unpickled. On one host (``ipc``) a shared-memory ring carries a second copy of the hot
frames (see "Shared-memory fast path" below).

Wire format: every message is three frames ``[header, payload, mac]``:

* ``header`` = msgpack ``[kind, seq, sender, step_id]``

  - ``kind``: ``"plan"`` (driver -> workers), ``"res"`` / ``"err"`` (worker -> driver),
    ``"ctl"`` (either way: ``sync`` / ``shutdown`` from the driver, ``ready`` / ``ack`` from
    workers; the command is in the msgpack payload).
  - ``seq``: the sender's message counter, strictly increasing on each channel. It is the
    replay guard: a receiver drops any frame whose ``seq`` is not strictly greater than the
    last one it accepted from that sender. (A separate counter, rather than the step id, so
    control messages interleaved with plans are ordered too; plans and results carry their
    step id in ``step_id``.)
  - ``sender``: ``-1`` for the driver, the rank for workers.

* ``mac`` = HMAC-SHA256(key, header + payload), checked with ``hmac.compare_digest``
  (computed from the key's precomputed inner/outer SHA-256 states: the same MAC as
  ``hmac.digest``, without its per-call key setup).

A frame with the wrong number of parts, a bad MAC, a malformed header, an unknown kind (or a
kind that does not belong on that socket) or a stale ``seq`` is dropped *before the payload is
looked at* and logged on ``logging.getLogger("distllm.transport")``; the receiver then keeps
waiting for a valid frame until its timeout.

Handshake (the PUB/SUB slow-joiner problem): a SUB socket only receives messages published
after its subscription reached the PUB, so a plan published too early would be silently lost.

1. Each ``WorkerChannel`` connects its SUB and PUSH sockets and immediately sends a signed
   ``ctl ready`` (its rank) on PUSH (PUSH queues it until the connection is up, so it is not
   lost).
2. ``DriverChannel.wait_for_workers(n)`` publishes signed ``ctl sync`` messages (every 2 ms,
   backing off to 50 ms) while collecting ``ready`` and ``ack`` messages on PULL.
3. A worker that receives its first ``sync`` (in ``handshake()`` or in ``recv_plan()``)
   answers with a signed ``ctl ack``. Receiving a sync proves its subscription is registered
   at the PUB; since a PUB->SUB pipe is ordered and (with an unlimited HWM, see below) never
   drops, every plan published afterwards reaches that worker.
4. ``wait_for_workers`` returns once ranks ``0..n-1`` have all acked; only then does the
   driver send the first plan. Extra syncs still queued at a worker are skipped silently.

Receiving: a thread blocked in ``poll`` pays an OS wake-up when ZeroMQ's I/O thread hands it a
message, on every hop. ``_recv`` first polls the socket without sleeping for up to
``RECV_SPIN_S`` (never past its deadline), so a plan or result that comes quickly is taken at
once; only then does it block.

Shared-memory fast path (``ipc`` only; ``DISTLLM_SHM_TRANSPORT=0`` turns it off). Spinning
cannot remove ZeroMQ's own hand-offs: app thread -> I/O thread -> socket -> the peer's I/O
thread -> app thread, each a thread wake-up, a large part of a step's transport time. So the
frames also go through shared memory, where a spinning receiver sees them at once:

* Two rings (``shm_ring.py``: mmap'd files in a per-engine 0700 dir, under /dev/shm when it
  can be; paths in ``TransportConfig``): plans, written by the driver and read by every rank,
  and results, written by rank 0 for its ``res`` frames only (other ranks, errors and control
  frames from workers stay on ZeroMQ alone). Every channel maps its rings when it is made; the
  driver unlinks the files once the handshake is done (``cleanup()`` too, if it has not), so
  a killed engine leaves no shared memory behind.
* Every frame that fits a slot is written into ring slot ``seq % nslots`` as the same signed
  ``[header, payload, mac]``: the slot's seq is zeroed, the frame written, the seq written
  last. Nobody waits for anybody; a slow reader is lapped, not waited for.
* A receiver takes the sender's next seq from the ring only: the slot must hold that seq
  before and after the bytes are copied out, the MAC must verify and the signed header must
  carry that seq and sender. Anything else (not written yet, lapped, torn, too big for a slot,
  tampered) is silently "not in shm": the frame comes on ZeroMQ. Taking only the next seq keeps
  frames in order with those that came on ZeroMQ alone.
* Acked copies. Each reader writes the seq of every frame it takes, and whether it is asleep
  in poll, into its slot of a third shared file (``shm_ring.AckBoard``). A *hot* frame (plan,
  result) waits as an unsent ZeroMQ copy: skipped once every reader has acked it, sent when a
  reader is asleep (the copy wakes it), when ``COPY_DELAY_S`` passes first, or before its ring
  slot is reused. Every other frame (control, errors, frames too big for a slot) goes on
  ZeroMQ at once, after the copies still due, so ZeroMQ keeps each sender's order. A writer
  settles its waiting copies whenever it sends or receives, and its poll() wakes for the next
  one due. In the steady state of a step loop the readers take every frame from the ring
  within microseconds and no copy is sent: a round trip pays the ring, not ZeroMQ's four
  thread wake-ups. A rank that cannot map the ack file never acks, so the writer then sends
  every copy at once (the handshake's ``ack``/``sync`` say who acks).
* A ZeroMQ copy of a frame already taken from shm is dropped silently: it is recognised as
  byte-for-byte the frame taken (no second HMAC) and does not count in ``num_dropped``. (So a
  replay of such a frame is dropped without a log line, unless the frame's own copy came
  first.) Every other frame is checked, and dropped and logged when bad, as before.
* ``_recv`` looks at the ring (one struct read) before ZeroMQ, spins, then marks itself asleep,
  looks at the ring once more and blocks in ZeroMQ's poll, at most ``_RING_POLL_MAX_S`` at a
  time (a backstop for the rare writer that read the mark just before it was set). A worker
  reads its ring only after its handshake sync came on ZeroMQ (which is what proves its
  subscription), so the handshake is as before. Error frames, timeouts and worker-death
  detection are unchanged.

HWMs: PUB silently *drops* messages for a subscriber whose queue is full, and a lost plan would
hang the engine, so the plan path (PUB/SUB) has no HWM; it is bounded by the step loop (one or
two plans in flight) and by the handshake's sync back-off. PUSH blocks instead of dropping, so
the result path keeps a finite HWM. LINGER is 0 everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import shutil
import socket
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from distllm.distributed.shm_ring import ACK_DRIVER_SLOT, EMPTY, AckBoard, ShmRing, create_ack_board, create_ring

logger = logging.getLogger("distllm.transport")

DRIVER_SENDER = -1

KIND_PLAN = "plan"
KIND_RESULT = "res"
KIND_ERROR = "err"
KIND_CTL = "ctl"

CTL_SYNC = "sync"
CTL_SHUTDOWN = "shutdown"
CTL_READY = "ready"
CTL_ACK = "ack"

# Kinds each side accepts.
_DRIVER_ACCEPTS = frozenset({KIND_RESULT, KIND_ERROR, KIND_CTL})
_WORKER_ACCEPTS = frozenset({KIND_PLAN, KIND_CTL})

RESULT_HWM = 10_000
_SYNC_INTERVAL_MIN_S = 0.002
_SYNC_INTERVAL_MAX_S = 0.05
_MAX_IPC_PATH = 100  # sun_path is 108 bytes on Linux (104 on macOS)
# How long a receive polls its socket without sleeping before it blocks in poll(). A thread
# blocked in poll() is woken by the OS when ZeroMQ's I/O thread hands it the message: tens of us
# per hop on an idle host (hundreds on a busy VM), and a step pays it on every hop. A plan or
# result that arrives within the spin is taken at once. 200 us covers a step's whole transport
# round trip with a worker that answers at once; a longer wait (a model step) still ends up
# asleep in poll(). Each check is a cheap getsockopt followed by sched_yield(), which releases
# the GIL (other driver threads keep running) and gives the core to any runnable thread (on a
# 2-core machine the spinner does not starve the process it waits for).
# DISTLLM_RECV_SPIN_US overrides it (0: no spinning).
RECV_SPIN_S = float(os.environ.get("DISTLLM_RECV_SPIN_US", "200")) * 1e-6
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))
# Recent frames taken from shm, kept to recognise a ZeroMQ copy of one that was sent anyway
# (copies come in order, at most this many frames late, even on a loaded host).
_TAKEN_MAX = 1024
# A receiver that keeps finding its frames in the ring looks at ZeroMQ at least every this many
# frames, to drain copies sent anyway (for a reader that was slow to ack), so none pile up.
_DRAIN_EVERY = 16
# How long a hot frame's ZeroMQ copy waits for its readers' acks before it is sent anyway: a
# spinning reader takes a frame from the ring within microseconds; one that is busy elsewhere
# gets the copy, which wakes it wherever it waits. DISTLLM_SHM_COPY_DELAY_US overrides it.
COPY_DELAY_S = float(os.environ.get("DISTLLM_SHM_COPY_DELAY_US", "200")) * 1e-6
# Longest sleep in poll() for a reader of a ring, which looks at the ring again after it: the
# backstop for a writer that saw it awake and skipped the copy just as it fell asleep (such a
# writer also sends the copy once COPY_DELAY_S passes, if it is receiving meanwhile, as a
# driver waiting for its result is). An idle reader wakes this often: 100 times a second.
_RING_POLL_MAX_S = 0.01


def shm_enabled() -> bool:
    """The shared-memory fast path is on unless DISTLLM_SHM_TRANSPORT is 0/false/off/no."""
    return os.environ.get("DISTLLM_SHM_TRANSPORT", "1").strip().lower() not in ("0", "false", "off", "no")


class TransportError(RuntimeError):
    pass


class ShutdownRequested(Exception):
    """Raised by ``WorkerChannel.recv_plan`` when the driver sent a shutdown."""


class WorkerError(RuntimeError):
    """Raised by ``DriverChannel.recv_result`` when a worker sent an error frame."""

    def __init__(self, rank: int, message: str, step_id: int | None = None):
        at = f" at step {step_id}" if step_id is not None else ""
        super().__init__(f"worker rank {rank} failed{at}: {message}")
        self.rank = rank
        self.message = message
        self.step_id = step_id


# ---- configuration -----------------------------------------------------------------------


def _split_tcp(addr: str) -> tuple[str, int]:
    if not addr.startswith("tcp://"):
        raise ValueError(f"not a tcp endpoint: {addr!r}")
    rest = addr[len("tcp://") :]
    host, sep, port = rest.rpartition(":")
    if not sep:
        raise ValueError(f"tcp endpoint without a port: {addr!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, (0 if port == "*" else int(port))


def _join_tcp(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def check_bind_host(host: str) -> None:
    """Refuse wildcard binds: the transport binds one named interface address."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h in ("", "*"):
        raise ValueError(f"refusing to bind the transport to all interfaces ({host!r}); name one interface address")
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        return  # an interface or host name
    if ip.is_unspecified:
        raise ValueError(f"refusing to bind the transport to all interfaces ({host!r}); name one interface address")


def _free_tcp_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class TransportConfig:
    plan_addr: str
    result_addr: str
    hmac_key: bytes
    # The per-engine temp dir holding the ipc sockets (None for tcp); removed by cleanup().
    ipc_dir: str | None = None
    # The shared-memory fast path (ipc only; None: ZeroMQ only): the ring files for plans and
    # for rank 0's results, in shm_dir, a per-engine 0700 dir (under /dev/shm when it can be,
    # else ipc_dir itself); removed by cleanup().
    shm_dir: str | None = None
    plan_ring: str | None = None
    result_ring: str | None = None
    # Where readers acknowledge the frames they took (see shm_ring.AckBoard), beside the rings.
    ack_board: str | None = None

    @classmethod
    def create(cls, mode: str = "ipc", host: str = "127.0.0.1", shm: bool | None = None) -> "TransportConfig":
        """``shm``: make the shared-memory rings (ipc only); None: unless DISTLLM_SHM_TRANSPORT=0."""
        key = secrets.token_bytes(32)
        if mode == "ipc":
            d = tempfile.mkdtemp(prefix="distllm-")  # mode 0700: only this user can connect
            if len(os.path.join(d, "results.sock")) > _MAX_IPC_PATH:
                shutil.rmtree(d, ignore_errors=True)
                d = tempfile.mkdtemp(prefix="distllm-", dir="/tmp")
            cfg = cls(f"ipc://{os.path.join(d, 'plans.sock')}", f"ipc://{os.path.join(d, 'results.sock')}", key, d)
            if shm_enabled() if shm is None else shm:
                cfg._make_rings()
            return cfg
        if mode == "tcp":
            check_bind_host(host)
            host = host.strip().strip("[]")
            # Ports are picked free now so the config is complete at once; if one is taken in
            # between, DriverChannel rebinds to a random port and updates this config in place.
            p1 = _free_tcp_port(host)
            p2 = _free_tcp_port(host)
            while p2 == p1:
                p2 = _free_tcp_port(host)
            return cls(_join_tcp(host, p1), _join_tcp(host, p2), key, None)
        raise ValueError(f"unknown transport mode {mode!r} (expected 'ipc' or 'tcp')")

    def _make_rings(self) -> None:
        """Create the two ring files; on failure the fast path is just off (ZeroMQ carries all)."""
        d = None
        try:
            if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
                d = tempfile.mkdtemp(prefix="distllm-", dir="/dev/shm")  # 0700, unique per engine
            else:
                d = self.ipc_dir
            plan_ring, result_ring = os.path.join(d, "plans.ring"), os.path.join(d, "results.ring")
            ack_board = os.path.join(d, "acks")
            create_ring(plan_ring)
            create_ring(result_ring)
            create_ack_board(ack_board)
        except OSError as e:
            logger.warning("transport: no shared-memory rings (%s); using ZeroMQ only", e)
            if d is not None and d != self.ipc_dir:
                shutil.rmtree(d, ignore_errors=True)
            return
        self.shm_dir, self.plan_ring, self.result_ring, self.ack_board = d, plan_ring, result_ring, ack_board

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_addr": self.plan_addr,
            "result_addr": self.result_addr,
            "hmac_key": self.hmac_key.hex(),
            "ipc_dir": self.ipc_dir,
            "shm_dir": self.shm_dir,
            "plan_ring": self.plan_ring,
            "result_ring": self.result_ring,
            "ack_board": self.ack_board,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransportConfig":
        key = bytes.fromhex(d["hmac_key"])
        if len(key) < 16:
            raise ValueError("hmac key too short")
        return cls(d["plan_addr"], d["result_addr"], key, d.get("ipc_dir"), d.get("shm_dir"), d.get("plan_ring"),
                   d.get("result_ring"), d.get("ack_board"))

    def unlink_rings(self) -> None:
        """Remove the ring files and their dir while they stay mapped. The driver does this once
        every rank has acked its handshake (a WorkerChannel maps its rings before it says ready),
        so a driver killed before cleanup() leaves nothing behind in /dev/shm (which is memory).
        A channel opened later finds no ring and uses ZeroMQ alone."""
        for path in (self.plan_ring, self.result_ring, self.ack_board):
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if self.shm_dir and self.shm_dir != self.ipc_dir:
            try:
                os.rmdir(self.shm_dir)
            except OSError:
                pass

    def cleanup(self) -> None:
        """Remove the per-engine ipc and shm dirs (driver side, after the channels are closed)."""
        for d in (self.shm_dir, self.ipc_dir):
            if d:
                shutil.rmtree(d, ignore_errors=True)


# ---- framing -----------------------------------------------------------------------------


def sign(key: bytes, header: bytes, payload: bytes) -> bytes:
    return hmac.digest(key, header + payload, "sha256")


_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))


class _Mac:
    """HMAC-SHA256 with the key's inner and outer hash states made once (RFC 2104): equal to
    ``sign``, a few microseconds cheaper per message, which matters at a few KB a message."""

    def __init__(self, key: bytes):
        if len(key) > 64:  # SHA-256's block size
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(key.translate(_IPAD))
        self._outer = hashlib.sha256(key.translate(_OPAD))

    def __call__(self, header: bytes, payload: bytes) -> bytes:
        h = self._inner.copy()
        h.update(header)
        h.update(payload)
        o = self._outer.copy()
        o.update(h.digest())
        return o.digest()


def make_frames(key: bytes, kind: str, seq: int, sender: int, step_id: int, payload: bytes) -> list[bytes]:
    header = msgpack.packb([kind, seq, sender, step_id])
    return [header, payload, sign(key, header, payload)]


class _Endpoint:
    """Shared framing / verification / receiving for both sides."""

    _accepts: frozenset[str]
    _name: str

    def __init__(self, config: TransportConfig):
        self.config = config
        self._mac = _Mac(config.hmac_key)
        self._ctx = zmq.Context(io_threads=1)  # one per channel: never shared across processes
        self._seq = 0
        self._last_seq: dict[int, int] = {}
        self._closed = False
        self.num_dropped = 0
        # The shared-memory fast path (see the module docstring); set up by the subclasses.
        self._ring_out: ShmRing | None = None  # where this side's frames get a second copy
        self._ring_in: ShmRing | None = None  # where frames from _ring_sender may come first
        self._ring_sender = DRIVER_SENDER
        # Recent frames taken from _ring_in, oldest first (their ZeroMQ copies are dropped).
        # Keyed by the signed header, which names the frame's seq: one lookup finds the frame.
        self._taken: dict[bytes, list[bytes]] = {}
        self._ring_streak = 0  # frames taken from the ring since ZeroMQ was last found empty
        # Acks (shm_ring.AckBoard): this side's slot for frames from _ring_sender, and the
        # slots of the readers of _ring_out that must all ack a hot frame before its ZeroMQ
        # copy is skipped (None: every copy is sent at once). Set by the subclasses.
        self._acks: AckBoard | None = None
        self._ack_slot: int | None = None
        self._copy_readers: list[int] | None = None
        # Hot frames written to the ring whose ZeroMQ copy waits for acks, oldest first:
        # (seq, socket, frames, when the copy is sent anyway).
        self._unsent: deque[tuple[int, zmq.Socket, list[bytes], float]] = deque()
        self.copies_sent = 0  # ZeroMQ copies of hot frames sent (a reader was slow or asleep)
        self.copies_skipped = 0  # ... and skipped, every reader having taken the frame from shm
        # A seq the ring will not give (lapped, torn, failed MAC): wait for its ZeroMQ copy.
        self._ring_skip = 0
        self.shm_taken = 0  # frames taken from shm
        self.shm_missed = 0  # frames the ring had but could not give (lapped, torn, failed MAC)

    def _sock(self, kind: int) -> zmq.Socket:
        s = self._ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        return s

    def _open_ring(self, path: str | None, writable: bool) -> ShmRing | None:
        if path is None or not shm_enabled():
            return None
        try:
            return ShmRing(path, writable)
        except (OSError, ValueError) as e:
            logger.warning("%s: shared-memory ring unavailable (%s); using ZeroMQ only", self._name, e)
            return None

    def _open_acks(self, path: str | None) -> AckBoard | None:
        if path is None or not shm_enabled():
            return None
        try:
            return AckBoard(path)
        except (OSError, ValueError) as e:
            logger.warning("%s: shared-memory acks unavailable (%s); every frame goes on ZeroMQ", self._name, e)
            return None

    def _frames(self, kind: str, step_id: int, payload: bytes, sender: int) -> list[bytes]:
        self._seq += 1
        header = msgpack.packb([kind, self._seq, sender, step_id])
        return [header, payload, self._mac(header, payload)]

    def _send(self, sock: zmq.Socket, kind: str, step_id: int, payload: bytes, sender: int, shm: bool,
              hot: bool = False) -> None:
        """Sign and send one frame on ZeroMQ; with ``shm``, put a copy in the ring first (when it
        fits a slot) so a spinning reader can take it without waiting for ZeroMQ's I/O threads.

        A ``hot`` frame (plan, result) in the ring sends its ZeroMQ copy only if its readers
        have not all acked it within COPY_DELAY_S, or one of them is asleep in poll (see
        _flush_copies). Every other frame goes on ZeroMQ at once, after the copies still due,
        so ZeroMQ keeps the senders' order."""
        frames = self._frames(kind, step_id, payload, sender)
        seq = self._seq
        ring = self._ring_out
        if shm and ring is not None:
            if self._unsent:  # a copy whose slot this write takes must go on ZeroMQ now
                self._flush_copies(upto=seq - ring.nslots)
            if ring.write(seq, *frames) and hot and self._copy_readers:
                self._unsent.append((seq, sock, frames, time.monotonic() + COPY_DELAY_S))
                self._flush_copies()  # at once if a reader is asleep
                return
        if self._unsent:
            self._flush_copies(force=True)
        sock.send_multipart(frames, copy=len(payload) < 65536)

    def _flush_copies(self, force: bool = False, upto: int = 0) -> None:
        """Settle the waiting copies, oldest first: skip those every reader acked; send those
        due (``force``, seq <= ``upto``, past their time, or a reader asleep)."""
        unsent, acks, readers = self._unsent, self._acks, self._copy_readers
        now = None
        while unsent:
            seq, sock, frames, due = unsent[0]
            if min(acks.acked(r) for r in readers) >= seq:
                unsent.popleft()
                self.copies_skipped += 1
                continue
            if not force and seq > upto:
                if now is None:
                    now = time.monotonic()
                if now < due and not any(acks.asleep(r) for r in readers):
                    return
            unsent.popleft()
            sock.send_multipart(frames, copy=len(frames[1]) < 65536)
            self.copies_sent += 1

    def _took(self, seq: int) -> None:
        """Ack a frame from _ring_sender (taken from the ring or from ZeroMQ)."""
        if self._ack_slot is not None:
            self._acks.set_acked(self._ack_slot, seq)

    def _drop(self, reason: str) -> None:
        self.num_dropped += 1
        logger.warning("%s: dropped a frame: %s", self._name, reason)

    def _check(self, frames: list[bytes]) -> tuple[str, int, int, int, bytes] | str:
        """(kind, seq, sender, step_id, payload) of a signed, well-formed frame meant for this
        side, or why it is not one (the seq is not checked here)."""
        if len(frames) != 3:
            return f"expected 3 frames, got {len(frames)}"
        header, payload, mac = frames
        if len(mac) != 32 or not hmac.compare_digest(self._mac(header, payload), mac):
            return "bad HMAC"
        try:
            h = msgpack.unpackb(header, raw=False)
            kind, seq, sender, step_id = h
            if not (isinstance(kind, str) and type(seq) is int and type(sender) is int and type(step_id) is int):
                raise ValueError(h)
        except Exception:  # noqa: BLE001 - a signed but malformed header
            return "malformed header"
        if kind not in self._accepts:
            return f"unexpected kind {kind!r}"
        if not self._sender_ok(sender):
            return f"unexpected sender {sender}"
        return kind, seq, sender, step_id, payload

    def _verify(self, frames: list[bytes]) -> tuple[str, int, int, bytes] | None:
        """Return (kind, sender, step_id, payload) or None (dropped and logged)."""
        c = self._check(frames)
        if type(c) is str:
            self._drop(c)
            return None
        kind, seq, sender, step_id, payload = c
        last = self._last_seq.get(sender, 0)
        if seq <= last:
            self._drop(f"replayed/stale frame from sender {sender} (seq {seq} <= {last})")
            return None
        self._last_seq[sender] = seq
        return kind, sender, step_id, payload

    def _sender_ok(self, sender: int) -> bool:
        raise NotImplementedError

    def _ring_ready(self) -> bool:
        """Whether frames may be taken from _ring_in now (the worker waits for its first sync)."""
        return True

    # -- receiving

    def _from_zmq(self, frames: list[bytes]) -> tuple[str, int, int, bytes] | None:
        taken = self._taken
        if taken and len(frames) == 3:
            # The ZeroMQ copy of a frame already taken from shm: byte for byte the frame that
            # was verified there, so it is dropped silently, without another HMAC.
            t = taken.pop(frames[0], None)
            if t is not None and t[2] == frames[2] and t[1] == frames[1]:
                return None
        v = self._verify(frames)  # anything else: checked (and logged when bad) as always
        if v is not None and v[1] == self._ring_sender:
            taken.clear()  # a newer frame came on ZeroMQ: the older copies are not coming
            self._took(self._last_seq[v[1]])
        return v

    def _from_ring(self, ring: ShmRing) -> tuple[str, int, int, bytes] | None:
        """The sender's next frame if the ring holds it intact and signed; None otherwise.

        Only the very next seq is taken, so frames stay in order with those that came on
        ZeroMQ alone (too big for a slot, or not written to the ring). Misses are silent: the
        ZeroMQ copy of every frame follows."""
        sender = self._ring_sender
        seq = self._last_seq.get(sender, 0) + 1
        if seq == self._ring_skip:
            return None
        got = ring.read(seq)
        if type(got) is int:
            if got != EMPTY:  # lapped or torn: this one has to come on ZeroMQ
                self._ring_skip = seq
                self.shm_missed += 1
            return None
        c = self._check(got)
        if type(c) is str or c[1] != seq or c[2] != sender:  # torn (or forged): not in shm
            self._ring_skip = seq
            self.shm_missed += 1
            return None
        self._last_seq[sender] = seq
        self._took(seq)
        taken = self._taken
        if len(taken) >= _TAKEN_MAX:
            del taken[next(iter(taken))]  # the oldest: its copy, if sent, is long drained
        taken[got[0]] = got
        self.shm_taken += 1
        return c[0], sender, c[3], c[4]

    def _recv(self, sock: zmq.Socket, deadline: float) -> tuple[str, int, int, bytes] | None:
        """The next valid (kind, sender, step_id, payload) before the deadline, or None.

        Each pass settles this side's waiting copies, looks at the ring, then ZeroMQ; it spins
        (see RECV_SPIN_S) and then blocks in poll(), where a ZeroMQ frame wakes it. The ring
        goes first because it is cheap to look at (ZeroMQ's EVENTS check costs several times
        more) and the next frame is usually there first; order is kept because the ring only
        ever gives the sender's next seq. A receiver that keeps finding its frames in the ring
        looks at ZeroMQ first every _DRAIN_EVERY frames, to drain the copies sent anyway.
        Before blocking, a ring reader marks itself asleep (a writer then sends its copy at
        once), looks at the ring once more, and sleeps at most _RING_POLL_MAX_S at a time.
        """
        ring = self._ring_in
        spin_until = -1.0
        asleep = False  # marked asleep in the ack board (from the first poll() to the return)
        try:
            while True:
                if self._unsent:
                    self._flush_copies()
                shm = ring is not None and self._ring_ready()
                if shm and self._ring_streak < _DRAIN_EVERY:
                    v = self._from_ring(ring)
                    if v is not None:
                        self._ring_streak += 1
                        return v
                    shm = False  # looked already
                if sock.get(zmq.EVENTS) & zmq.POLLIN:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        frames = None
                    if frames is not None:
                        v = self._from_zmq(frames)
                        if v is not None:
                            return v
                        continue
                else:
                    self._ring_streak = 0  # nothing on ZeroMQ to drain
                if shm:
                    v = self._from_ring(ring)
                    if v is not None:
                        self._ring_streak += 1
                        return v
                now = time.monotonic()
                if spin_until < 0:
                    spin_until = min(deadline, now + RECV_SPIN_S)
                if now < spin_until:
                    _yield()
                    continue
                wait = deadline - now
                if wait <= 0:
                    return None
                if self._unsent:
                    wait = min(wait, self._unsent[0][3] - now)
                if ring is not None and self._ring_ready():
                    wait = min(wait, _RING_POLL_MAX_S)
                    if not asleep and self._ack_slot is not None:
                        self._acks.set_asleep(self._ack_slot, True)
                        asleep = True
                        continue  # look at the ring once more: a writer may have missed the mark
                sock.poll(max(1, int(wait * 1000 + 0.999)))
        finally:
            if asleep:
                self._acks.set_asleep(self._ack_slot, False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._sockets():
            s.close(linger=0)
        self._ctx.term()
        self._unsent.clear()
        for ring in (self._ring_in, self._ring_out, self._acks):
            if ring is not None:
                ring.close()

    def _sockets(self) -> list[zmq.Socket]:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ctl(cmd: str, **kw: Any) -> bytes:
    return msgpack.packb({"cmd": cmd, **kw})


def _ctl_dict(payload: bytes) -> dict:
    try:
        d = msgpack.unpackb(payload, raw=False)
        return d if isinstance(d, dict) else {}
    except Exception:  # noqa: BLE001
        return {}


def _ctl_cmd(payload: bytes) -> str | None:
    return _ctl_dict(payload).get("cmd")


# ---- driver side -------------------------------------------------------------------------


class DriverChannel(_Endpoint):
    """PUB bound at plan_addr (plans to every rank), PULL bound at result_addr."""

    _accepts = _DRIVER_ACCEPTS
    _name = "driver"

    def __init__(self, config: TransportConfig):
        super().__init__(config)
        try:
            self._pub = self._sock(zmq.PUB)
            self._pub.setsockopt(zmq.SNDHWM, 0)  # PUB drops at HWM; a lost plan would hang
            config.plan_addr = self._bind(self._pub, config.plan_addr)
            self._pull = self._sock(zmq.PULL)
            self._pull.setsockopt(zmq.RCVHWM, RESULT_HWM)
            config.result_addr = self._bind(self._pull, config.result_addr)
            # Fast path: every frame to the workers also goes in the plan ring; rank 0's
            # results may come first through the result ring.
            self._ring_out = self._open_ring(config.plan_ring, writable=True)
            self._ring_in = self._open_ring(config.result_ring, writable=False)
            self._ring_sender = 0
            if self._ring_out is not None or self._ring_in is not None:
                self._acks = self._open_acks(config.ack_board)
            if self._acks is not None and self._ring_in is not None:
                self._ack_slot = ACK_DRIVER_SLOT
        except Exception:
            self.close()
            raise
        self.ready_ranks: set[int] = set()
        self.acked_ranks: set[int] = set()
        self._ring_ranks: set[int] = set()  # ranks that read the plan ring and ack in shm

    def _sockets(self) -> list[zmq.Socket]:
        return [s for s in (getattr(self, "_pub", None), getattr(self, "_pull", None)) if s is not None]

    @staticmethod
    def _bind(sock: zmq.Socket, addr: str) -> str:
        if not addr.startswith("tcp://"):
            sock.bind(addr)
            return addr
        host, port = _split_tcp(addr)
        check_bind_host(host)
        base = _join_tcp(host, 0)[: -len(":0")]
        if port:
            try:
                sock.bind(addr)
                return addr
            except zmq.ZMQError as e:
                if e.errno != zmq.EADDRINUSE:
                    raise
                logger.info("driver: %s is taken; binding a random port instead", addr)
        port = sock.bind_to_random_port(base, min_port=1024, max_port=65535, max_tries=200)
        return _join_tcp(host, port)

    def _sender_ok(self, sender: int) -> bool:
        return sender >= 0

    # -- handshake

    def wait_for_workers(self, n: int, timeout_s: float) -> None:
        """Block until ranks 0..n-1 are subscribed (have acked a sync); raise TimeoutError."""
        want = set(range(n))
        deadline = time.monotonic() + timeout_s
        interval = _SYNC_INTERVAL_MIN_S
        next_sync = 0.0
        while not want <= self.acked_ranks:
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(
                    f"transport handshake timed out after {timeout_s}s: ready ranks {sorted(self.ready_ranks)}, "
                    f"subscribed ranks {sorted(self.acked_ranks)}, expected {n}"
                )
            if now >= next_sync:
                self._send(self._pub, KIND_CTL, 0, _ctl(CTL_SYNC, ring=self._ack_slot is not None), DRIVER_SENDER,
                           shm=True)
                next_sync = now + interval
                interval = min(interval * 2, _SYNC_INTERVAL_MAX_S)
            v = self._recv(self._pull, min(deadline, next_sync))
            if v is None:
                continue
            kind, sender, step_id, payload = v
            if kind == KIND_CTL:
                self._handle_ctl(sender, payload)
            elif kind == KIND_ERROR:
                raise self._worker_error(sender, step_id, payload)
            else:
                self._drop(f"result for step {step_id} from rank {sender} before the handshake finished")
        self.config.unlink_rings()
        # Plan copies may wait for acks only when every rank reads the ring and acks there.
        if self._acks is not None and self._ring_out is not None and want <= self._ring_ranks and n < ACK_DRIVER_SLOT:
            self._copy_readers = sorted(want)

    def _handle_ctl(self, sender: int, payload: bytes) -> None:
        d = _ctl_dict(payload)
        cmd = d.get("cmd")
        if cmd == CTL_READY:
            self.ready_ranks.add(sender)
        elif cmd == CTL_ACK:
            self.ready_ranks.add(sender)
            self.acked_ranks.add(sender)
            if d.get("ring") is True:
                self._ring_ranks.add(sender)
        else:
            logger.warning("driver: unknown control command %r from rank %s", cmd, sender)

    @staticmethod
    def _worker_error(sender: int, step_id: int, payload: bytes) -> WorkerError:
        try:
            d = msgpack.unpackb(payload, raw=False)
            return WorkerError(int(d.get("rank", sender)), str(d.get("message", "")), step_id if step_id >= 0 else None)
        except Exception:  # noqa: BLE001
            return WorkerError(sender, "<undecodable error report>", step_id if step_id >= 0 else None)

    # -- steady state

    def send_plan(self, step_id: int, payload: bytes) -> None:
        self._send(self._pub, KIND_PLAN, step_id, payload, DRIVER_SENDER, shm=True, hot=True)

    def send_shutdown(self) -> None:
        self._send(self._pub, KIND_CTL, 0, _ctl(CTL_SHUTDOWN), DRIVER_SENDER, shm=True)

    def recv_result(self, timeout_s: float) -> tuple[int, bytes] | None:
        """Next valid (step_id, payload) from a worker; None on timeout; raises WorkerError."""
        deadline = time.monotonic() + timeout_s
        while True:
            v = self._recv(self._pull, deadline)
            if v is None:
                return None
            kind, sender, step_id, payload = v
            if kind == KIND_RESULT:
                return step_id, payload
            if kind == KIND_ERROR:
                raise self._worker_error(sender, step_id, payload)
            self._handle_ctl(sender, payload)  # late ready/ack: bookkeeping only


# ---- worker side -------------------------------------------------------------------------


class WorkerChannel(_Endpoint):
    """SUB connected to plan_addr (all topics), PUSH connected to result_addr."""

    _accepts = _WORKER_ACCEPTS

    def __init__(self, config: TransportConfig, rank: int):
        super().__init__(config)
        self.rank = rank
        self._name = f"worker rank {rank}"
        self._synced = False
        self._pending: deque[tuple[int, bytes]] = deque()
        try:
            self._sub = self._sock(zmq.SUB)
            self._sub.setsockopt(zmq.RCVHWM, 0)  # see module docstring: no plan may be dropped
            self._sub.setsockopt(zmq.SUBSCRIBE, b"")
            self._sub.connect(config.plan_addr)
            self._push = self._sock(zmq.PUSH)
            self._push.setsockopt(zmq.SNDHWM, RESULT_HWM)
            self._push.connect(config.result_addr)
            # Fast path: plans may come first through the plan ring (once synced); rank 0's
            # results also go in the result ring (other ranks and other kinds: ZeroMQ only).
            self._ring_in = self._open_ring(config.plan_ring, writable=False)
            self._ring_sender = DRIVER_SENDER
            if rank == 0:
                self._ring_out = self._open_ring(config.result_ring, writable=True)
            if self._ring_in is not None or self._ring_out is not None:
                self._acks = self._open_acks(config.ack_board)
            if self._acks is not None and self._ring_in is not None and rank < ACK_DRIVER_SLOT:
                self._ack_slot = rank
        except Exception:
            self.close()
            raise
        self._send(self._push, KIND_CTL, 0, _ctl(CTL_READY, rank=rank), rank, shm=False)

    def _sockets(self) -> list[zmq.Socket]:
        return [s for s in (getattr(self, "_sub", None), getattr(self, "_push", None)) if s is not None]

    def _sender_ok(self, sender: int) -> bool:
        return sender == DRIVER_SENDER

    @property
    def synced(self) -> bool:
        return self._synced

    def _ring_ready(self) -> bool:
        # Only a sync that came over ZeroMQ proves the subscription (see the handshake), so the
        # ring is not read before it; from then on ZeroMQ carries every frame, in order.
        return self._synced

    def _next(self, deadline: float, stop_on_sync: bool = False) -> tuple[int, bytes] | None:
        while True:
            v = self._recv(self._sub, deadline)
            if v is None:
                return None
            kind, _sender, step_id, payload = v
            if kind == KIND_PLAN:
                return step_id, payload
            d = _ctl_dict(payload)
            cmd = d.get("cmd")
            if cmd == CTL_SYNC:
                if not self._synced:
                    self._synced = True
                    # Result copies may wait for the driver's acks when it reads the ring.
                    if d.get("ring") is True and self._ring_out is not None and self._acks is not None:
                        self._copy_readers = [ACK_DRIVER_SLOT]
                    self._send(self._push, KIND_CTL, 0, _ctl(CTL_ACK, rank=self.rank, ring=self._ack_slot is not None),
                               self.rank, shm=False)
                    if stop_on_sync:
                        return None
            elif cmd == CTL_SHUTDOWN:
                raise ShutdownRequested()
            else:
                logger.warning("%s: unknown control command %r", self._name, cmd)

    def handshake(self, timeout_s: float) -> bool:
        """Wait for the driver's first sync and ack it (recv_plan also does this on its own)."""
        deadline = time.monotonic() + timeout_s
        while not self._synced:
            got = self._next(deadline, stop_on_sync=True)
            if got is None:
                return self._synced
            self._pending.append(got)  # a plan before the sync: keep it for recv_plan
        return True

    def recv_plan(self, timeout_s: float) -> tuple[int, bytes] | None:
        """Next valid (step_id, payload); None on timeout; raises ShutdownRequested."""
        if self._pending:
            return self._pending.popleft()
        return self._next(time.monotonic() + timeout_s)

    def send_result(self, step_id: int, payload: bytes) -> None:
        self._send(self._push, KIND_RESULT, step_id, payload, self.rank, shm=True, hot=True)

    def send_error(self, message: str, step_id: int | None = None) -> None:
        payload = msgpack.packb({"rank": self.rank, "message": message})
        self._send(self._push, KIND_ERROR, -1 if step_id is None else step_id, payload, self.rank, shm=False)
