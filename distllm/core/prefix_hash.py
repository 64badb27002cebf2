"""Chained, deterministic hashes of full KV blocks for prefix caching.

The hash of block i covers (hash of block i-1, the block's token ids, extra keys); the first
block's parent is the per-engine salt instead. Two requests share block i's KV exactly when their
first (i+1) * block_size tokens (and extra keys) are equal. sha256 over a msgpack encoding keeps
the hashes stable across processes and Python versions (no PYTHONHASHSEED dependence).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgpack


def normalize_salt(salt: bytes | str | None) -> bytes:
    if salt is None:
        return b""
    return salt.encode("utf-8") if isinstance(salt, str) else bytes(salt)


def hash_block_tokens(
    parent_hash: int | None,
    token_ids: Sequence[int],
    extra_keys: tuple[Any, ...] | None = None,
    salt: bytes | str = b"",
) -> int:
    """Hash of one full block. ``salt`` is mixed in only for the first block (parent None)."""
    parent: int | bytes = normalize_salt(salt) if parent_hash is None else parent_hash
    payload = msgpack.packb(
        [parent, [int(t) for t in token_ids], list(extra_keys) if extra_keys else None],
        use_bin_type=True,
    )
    # 63 bits: a plain non-negative int that msgpack, dict keys and logs all handle.
    return int.from_bytes(hashlib.sha256(payload).digest()[:8], "big") >> 1


def extend_block_chain(
    hashes: list[int],
    token_ids: Sequence[int],
    block_size: int,
    num_blocks: int,
    extra_keys: tuple[Any, ...] | None = None,
    salt: bytes | str = b"",
) -> None:
    """Append the hashes of ``num_blocks`` more blocks to ``hashes`` in place; ``token_ids``
    starts at the first token after the blocks ``hashes`` already covers."""
    for i in range(num_blocks):
        parent = hashes[-1] if hashes else None
        hashes.append(hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys, salt))


def hash_block_chain(
    token_ids: Sequence[int],
    block_size: int,
    parent_hashes: Sequence[int] = (),
    extra_keys: tuple[Any, ...] | None = None,
    salt: bytes | str = b"",
) -> list[int]:
    """Hashes of every full block of ``token_ids``, reusing the already known ``parent_hashes``.

    Returns the complete list (the known prefix followed by the new hashes).
    """
    hashes = list(parent_hashes)
    have = len(hashes)
    extend_block_chain(hashes, token_ids[have * block_size :], block_size, len(token_ids) // block_size - have,
                       extra_keys, salt)
    return hashes
