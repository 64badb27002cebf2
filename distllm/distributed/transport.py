"""The driver <-> worker ZeroMQ transport (used by the ``mp`` and ``ray`` executors).

The driver PUBlishes every StepPlan to all tensor-parallel ranks and PULLs rank 0's StepResult
(and any rank's error report). Payloads are opaque bytes: the caller encodes/decodes them with
``distllm.core.plan``'s msgpack functions. Nothing here imports torch or pickle, and nothing is
ever unpickled.

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

    @classmethod
    def create(cls, mode: str = "ipc", host: str = "127.0.0.1") -> "TransportConfig":
        key = secrets.token_bytes(32)
        if mode == "ipc":
            d = tempfile.mkdtemp(prefix="distllm-")  # mode 0700: only this user can connect
            if len(os.path.join(d, "results.sock")) > _MAX_IPC_PATH:
                shutil.rmtree(d, ignore_errors=True)
                d = tempfile.mkdtemp(prefix="distllm-", dir="/tmp")
            return cls(f"ipc://{os.path.join(d, 'plans.sock')}", f"ipc://{os.path.join(d, 'results.sock')}", key, d)
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_addr": self.plan_addr,
            "result_addr": self.result_addr,
            "hmac_key": self.hmac_key.hex(),
            "ipc_dir": self.ipc_dir,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TransportConfig":
        key = bytes.fromhex(d["hmac_key"])
        if len(key) < 16:
            raise ValueError("hmac key too short")
        return cls(d["plan_addr"], d["result_addr"], key, d.get("ipc_dir"))

    def cleanup(self) -> None:
        """Remove the per-engine ipc dir (driver side, after the channels are closed)."""
        if self.ipc_dir:
            shutil.rmtree(self.ipc_dir, ignore_errors=True)


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
    """Shared framing / verification for both sides."""

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

    def _sock(self, kind: int) -> zmq.Socket:
        s = self._ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        return s

    def _frames(self, kind: str, step_id: int, payload: bytes, sender: int) -> list[bytes]:
        self._seq += 1
        header = msgpack.packb([kind, self._seq, sender, step_id])
        return [header, payload, self._mac(header, payload)]

    def _drop(self, reason: str) -> None:
        self.num_dropped += 1
        logger.warning("%s: dropped a frame: %s", self._name, reason)

    def _verify(self, frames: list[bytes]) -> tuple[str, int, int, bytes] | None:
        """Return (kind, sender, step_id, payload) or None (dropped and logged)."""
        if len(frames) != 3:
            self._drop(f"expected 3 frames, got {len(frames)}")
            return None
        header, payload, mac = frames
        if len(mac) != 32 or not hmac.compare_digest(self._mac(header, payload), mac):
            self._drop("bad HMAC")
            return None
        try:
            h = msgpack.unpackb(header, raw=False)
            kind, seq, sender, step_id = h
            if not (isinstance(kind, str) and type(seq) is int and type(sender) is int and type(step_id) is int):
                raise ValueError(h)
        except Exception:  # noqa: BLE001 - a signed but malformed header
            self._drop("malformed header")
            return None
        if kind not in self._accepts:
            self._drop(f"unexpected kind {kind!r}")
            return None
        if not self._sender_ok(sender):
            self._drop(f"unexpected sender {sender}")
            return None
        last = self._last_seq.get(sender, 0)
        if seq <= last:
            self._drop(f"replayed/stale frame from sender {sender} (seq {seq} <= {last})")
            return None
        self._last_seq[sender] = seq
        return kind, sender, step_id, payload

    def _sender_ok(self, sender: int) -> bool:
        raise NotImplementedError

    def _recv(self, sock: zmq.Socket, deadline: float) -> list[bytes] | None:
        """Receive one raw multipart message before the deadline, or None."""
        try:
            return sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            pass
        now = time.monotonic()
        spin_until = min(deadline, now + RECV_SPIN_S)
        while now < spin_until:  # see RECV_SPIN_S
            if sock.get(zmq.EVENTS) & zmq.POLLIN:
                try:
                    return sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    pass
            _yield()
            now = time.monotonic()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if sock.poll(max(1, int(remaining * 1000 + 0.999))):
                try:
                    return sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self._sockets():
            s.close(linger=0)
        self._ctx.term()

    def _sockets(self) -> list[zmq.Socket]:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ctl(cmd: str, **kw: Any) -> bytes:
    return msgpack.packb({"cmd": cmd, **kw})


def _ctl_cmd(payload: bytes) -> str | None:
    try:
        d = msgpack.unpackb(payload, raw=False)
        return d.get("cmd") if isinstance(d, dict) else None
    except Exception:  # noqa: BLE001
        return None


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
        except Exception:
            self.close()
            raise
        self.ready_ranks: set[int] = set()
        self.acked_ranks: set[int] = set()

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
                self._pub.send_multipart(self._frames(KIND_CTL, 0, _ctl(CTL_SYNC), DRIVER_SENDER))
                next_sync = now + interval
                interval = min(interval * 2, _SYNC_INTERVAL_MAX_S)
            frames = self._recv(self._pull, min(deadline, next_sync))
            if frames is None:
                continue
            v = self._verify(frames)
            if v is None:
                continue
            kind, sender, step_id, payload = v
            if kind == KIND_CTL:
                self._handle_ctl(sender, payload)
            elif kind == KIND_ERROR:
                raise self._worker_error(sender, step_id, payload)
            else:
                self._drop(f"result for step {step_id} from rank {sender} before the handshake finished")

    def _handle_ctl(self, sender: int, payload: bytes) -> None:
        cmd = _ctl_cmd(payload)
        if cmd == CTL_READY:
            self.ready_ranks.add(sender)
        elif cmd == CTL_ACK:
            self.ready_ranks.add(sender)
            self.acked_ranks.add(sender)
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
        self._pub.send_multipart(self._frames(KIND_PLAN, step_id, payload, DRIVER_SENDER), copy=len(payload) < 65536)

    def send_shutdown(self) -> None:
        self._pub.send_multipart(self._frames(KIND_CTL, 0, _ctl(CTL_SHUTDOWN), DRIVER_SENDER))

    def recv_result(self, timeout_s: float) -> tuple[int, bytes] | None:
        """Next valid (step_id, payload) from a worker; None on timeout; raises WorkerError."""
        deadline = time.monotonic() + timeout_s
        while True:
            frames = self._recv(self._pull, deadline)
            if frames is None:
                return None
            v = self._verify(frames)
            if v is None:
                continue
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
        except Exception:
            self.close()
            raise
        self._push.send_multipart(self._frames(KIND_CTL, 0, _ctl(CTL_READY, rank=rank), rank))

    def _sockets(self) -> list[zmq.Socket]:
        return [s for s in (getattr(self, "_sub", None), getattr(self, "_push", None)) if s is not None]

    def _sender_ok(self, sender: int) -> bool:
        return sender == DRIVER_SENDER

    @property
    def synced(self) -> bool:
        return self._synced

    def _next(self, deadline: float, stop_on_sync: bool = False) -> tuple[int, bytes] | None:
        while True:
            frames = self._recv(self._sub, deadline)
            if frames is None:
                return None
            v = self._verify(frames)
            if v is None:
                continue
            kind, _sender, step_id, payload = v
            if kind == KIND_PLAN:
                return step_id, payload
            cmd = _ctl_cmd(payload)
            if cmd == CTL_SYNC:
                if not self._synced:
                    self._synced = True
                    self._push.send_multipart(self._frames(KIND_CTL, 0, _ctl(CTL_ACK, rank=self.rank), self.rank))
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
        self._push.send_multipart(self._frames(KIND_RESULT, step_id, payload, self.rank), copy=len(payload) < 65536)

    def send_error(self, message: str, step_id: int | None = None) -> None:
        payload = msgpack.packb({"rank": self.rank, "message": message})
        self._push.send_multipart(self._frames(KIND_ERROR, -1 if step_id is None else step_id, payload, self.rank))
