"""A single-writer ring of signed frames in a shared, mmap'd file (the transport's fast path).

One process writes, any number read; nobody waits for anybody. The ring is only a faster
second copy of frames that also travel over ZeroMQ, so a reader that misses a frame (not yet
written, overwritten by a writer that lapped it, torn by a concurrent write) simply takes the
ZeroMQ copy. That is why there are no read pointers, no back-pressure and no locks.

File layout (little-endian)::

    file header, 64 bytes:   magic "DLLMRING" | version u32 | nslots u32 | slot_size u32
    slot i at 64 + i * slot_size:
        seq u64 (0: nothing valid here) | header len u32 | payload len u32 | mac len u32 |
        4 bytes padding | header | payload | mac

Frame ``seq`` (the sender's transport counter, > 0) lives in slot ``seq % nslots``. The writer
sets the slot's seq to 0, writes lengths and bytes, then writes the seq last. A reader that
wants frame ``s`` reads the slot's seq; if it is ``s`` it copies the bytes out and reads the seq
again: unchanged means the writer did not touch the slot meanwhile (on x86-64 stores become
visible in program order). Nothing here trusts that: the transport verifies the HMAC and the
signed header's seq of every frame taken from the ring, so a torn copy is rejected whatever
the memory model, and the reader falls back to ZeroMQ.

Files are created (0600, in a 0700 dir) by ``create_ring``; ``ShmRing`` maps them with Python's
``mmap`` (not multiprocessing.shared_memory: its resource tracker unlinks a segment when any
process that opened it exits, on Python 3.11).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

SLOT_SIZE = 64 * 1024  # bytes per slot, its 24-byte slot header included
NUM_SLOTS = 16

_MAGIC = b"DLLMRING"
_VERSION = 1
_FILE_HDR = struct.Struct("<8sIII")
_FILE_HDR_SIZE = 64
_SEQ = struct.Struct("<Q")
_SLOT_HDR = struct.Struct("<QIII")  # seq, header len, payload len, mac len
_LENS = struct.Struct("<III")
_SLOT_HDR_SIZE = 24

# read() results other than the frames themselves.
EMPTY = 0  # frame not written (yet): the slot holds an older frame, or is being written
LAPPED = 1  # the slot already holds a newer frame (or was rewritten while being read)
TORN = 2  # the slot header is inconsistent (a write in progress): treat as not there


def create_ring(path: str, nslots: int = NUM_SLOTS, slot_size: int = SLOT_SIZE) -> None:
    """Create a zeroed ring file (every slot empty); fails if the path exists."""
    if nslots < 1 or slot_size < _SLOT_HDR_SIZE + 64 or slot_size % 8:
        raise ValueError(f"bad ring geometry: {nslots} slots of {slot_size} bytes")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Zero-filled, and allocated now: a page of a sparse file on a full tmpfs would kill
        # the process that first writes it (SIGBUS) instead of failing here (ENOSPC).
        os.posix_fallocate(fd, 0, _FILE_HDR_SIZE + nslots * slot_size)
        os.pwrite(fd, _FILE_HDR.pack(_MAGIC, _VERSION, nslots, slot_size), 0)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


class ShmRing:
    """One mapping of a ring file: the writer side (``writable=True``) or a reader."""

    def __init__(self, path: str, writable: bool = False):
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < _FILE_HDR_SIZE:
                raise ValueError(f"{path}: not a ring file (too short)")
            self._mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        finally:
            os.close(fd)  # the mapping keeps its own reference
        magic, version, nslots, slot_size = _FILE_HDR.unpack_from(self._mm, 0)
        if magic != _MAGIC or version != _VERSION or nslots < 1 or size != _FILE_HDR_SIZE + nslots * slot_size:
            self._mm.close()
            raise ValueError(f"{path}: not a ring file of this version")
        self.path = path
        self.nslots = nslots
        self.slot_size = slot_size
        # The largest header + payload + mac that fits one slot.
        self.max_frame = slot_size - _SLOT_HDR_SIZE

    def _slot(self, seq: int) -> int:
        return _FILE_HDR_SIZE + (seq % self.nslots) * self.slot_size

    def write(self, seq: int, header: bytes, payload: bytes, mac: bytes) -> bool:
        """Put frame ``seq`` in its slot; False (nothing written) when it does not fit."""
        hl, pl, ml = len(header), len(payload), len(mac)
        if hl + pl + ml > self.max_frame or seq <= 0:
            return False
        mm = self._mm
        off = self._slot(seq)
        _SLOT_HDR.pack_into(mm, off, 0, hl, pl, ml)  # seq 0 first: readers see no valid frame
        p = off + _SLOT_HDR_SIZE
        mm[p : p + hl] = header
        p += hl
        mm[p : p + pl] = payload
        p += pl
        mm[p : p + ml] = mac
        _SEQ.pack_into(mm, off, seq)  # published: last
        return True

    def slot_seq(self, seq: int) -> int:
        """The seq currently published in frame ``seq``'s slot (0: none)."""
        return _SEQ.unpack_from(self._mm, self._slot(seq))[0]

    def read(self, seq: int) -> list[bytes] | int:
        """Frame ``seq`` as ``[header, payload, mac]`` copies, or EMPTY / LAPPED / TORN.

        Frames are unverified bytes: the caller checks the MAC and the header's seq."""
        mm = self._mm
        off = self._slot(seq)
        cur = _SEQ.unpack_from(mm, off)[0]
        if cur != seq:
            return LAPPED if cur > seq else EMPTY
        # Read after the seq (a separate load), so they are the ones published with it.
        hl, pl, ml = _LENS.unpack_from(mm, off + 8)
        if hl + pl + ml > self.max_frame:
            return TORN
        p = off + _SLOT_HDR_SIZE
        q = p + hl
        r = q + pl
        frames = [mm[p:q], mm[q:r], mm[r : r + ml]]
        cur = _SEQ.unpack_from(mm, off)[0]
        if cur != seq:  # being rewritten (0) or rewritten (a newer seq) while we copied
            return LAPPED
        return frames

    def close(self) -> None:
        if not self._mm.closed:
            self._mm.close()


# ---- acknowledgements ----------------------------------------------------------------------
#
# Readers tell writers what they have taken, so a writer can skip the ZeroMQ copy of a frame
# every reader already has. One small file, mapped read-write by every channel of an engine:
# slot i (64 bytes, so two readers never share a cache line) holds
#
#     acked seq u64 (the last seq its reader took from the writer it reads) | asleep u64
#
# ``asleep`` is 1 while the reader is blocked in ZeroMQ's poll (its ZeroMQ copy must be sent at
# once to wake it). Slot ACK_DRIVER_SLOT is the driver's (reading rank 0's results); slot r
# < ACK_DRIVER_SLOT is rank r's (reading plans). Each word is read and written as one aligned
# 8-byte access (ctypes, not struct, whose standard-size packers go byte by byte), so a writer
# never reads a torn ack: a value above what the reader took would make it skip a copy the
# reader might need.

ACK_SLOTS = 64
ACK_DRIVER_SLOT = ACK_SLOTS - 1
_ACK_STRIDE = 64


def create_ack_board(path: str) -> None:
    """Create a zeroed ack file (nothing acked, nobody asleep); fails if the path exists."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, ACK_SLOTS * _ACK_STRIDE)
    except BaseException:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


class AckBoard:
    """One read-write mapping of an ack file."""

    def __init__(self, path: str):
        fd = os.open(path, os.O_RDWR)
        try:
            if os.fstat(fd).st_size != ACK_SLOTS * _ACK_STRIDE:
                raise ValueError(f"{path}: not an ack file")
            self._mm = mmap.mmap(fd, ACK_SLOTS * _ACK_STRIDE, access=mmap.ACCESS_WRITE)
        finally:
            os.close(fd)
        self.path = path
        # [slot] -> the slot's words, as ctypes views into the mapping (page-aligned, so each
        # word is 8-byte aligned).
        self._acked = [ctypes.c_uint64.from_buffer(self._mm, i * _ACK_STRIDE) for i in range(ACK_SLOTS)]
        self._asleep = [ctypes.c_uint64.from_buffer(self._mm, i * _ACK_STRIDE + 8) for i in range(ACK_SLOTS)]

    def set_acked(self, slot: int, seq: int) -> None:
        self._acked[slot].value = seq

    def acked(self, slot: int) -> int:
        return self._acked[slot].value

    def set_asleep(self, slot: int, asleep: bool) -> None:
        self._asleep[slot].value = 1 if asleep else 0

    def asleep(self, slot: int) -> bool:
        return self._asleep[slot].value != 0

    def close(self) -> None:
        if not self._mm.closed:
            self._acked = self._asleep = []  # the views pin the mapping: drop them first
            self._mm.close()
