"""Paged KV block manager: ref-counted blocks, an O(1) LRU free queue and a prefix cache.

Pure Python, driver side; the workers only ever see block ids.

- Every block has a ref count (the number of running requests whose block table holds it).
- Free blocks (ref count 0) wait in an LRU queue: allocation pops from the front, freeing appends
  to the back. A request's blocks are freed tail first, so its tail blocks are evicted first.
- A full, computed block is registered in the prefix cache under its chained hash. A free cached
  block keeps its hash -> block entry until it is popped for reuse (then the entry is evicted),
  so a later request with the same prefix can take it back out of the free queue.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from distllm.core.prefix_hash import extend_block_chain, normalize_salt

if TYPE_CHECKING:
    from distllm.core.request import Request


class KVBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None  # set while the block is in the prefix cache

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = False,
        hash_salt: bytes | str = b"",
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}.")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_salt = normalize_salt(hash_salt)
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Insertion-ordered set of free block ids: front = next to allocate (least recently freed).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached_blocks: dict[int, int] = {}  # block hash -> block id
        # Per request: how many leading blocks of its table are registered in the prefix cache.
        self.num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up
        self.prefix_cache_hits = 0  # tokens found

    # ---- accounting ------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (free cached blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def free_block_ids(self) -> list[int]:
        """Free queue in eviction order (front first); for tests and debugging."""
        return list(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- hashing ---------------------------------------------------------------------------

    def _skips_prefix_cache(self, request: "Request") -> bool:
        if request.is_pooling:
            return True
        sp = request.sampling_params
        return sp is not None and sp.prompt_logprobs is not None

    def _update_hashes(self, request: "Request", num_tokens: int) -> list[int]:
        """Hashes of the request's full blocks within its first ``num_tokens`` tokens."""
        bs = self.block_size
        need = num_tokens // bs
        hashes = request.block_hashes
        have = len(hashes)
        if have < need:
            # Only the new blocks' tokens are sliced out (a long request holds thousands).
            extra = (request.cache_salt,) if request.cache_salt else None
            extend_block_chain(hashes, request.token_ids_from(have * bs), bs, need - have, extra, self.hash_salt)
        return hashes if len(hashes) == need else hashes[:need]

    # ---- lookup / allocation ---------------------------------------------------------------

    def get_computed_blocks(self, request: "Request") -> tuple[list[int], int]:
        """Longest run of the request's leading full blocks found in the prefix cache.

        Never covers all tokens: the last token must be computed to get logits, so the hit is
        capped at ``num_tokens - 1`` rounded down to a block. Does not take references; pass the
        blocks to ``allocate_slots(new_computed_blocks=...)`` right after.
        """
        if not self.enable_prefix_caching or self._skips_prefix_cache(request):
            return [], 0
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._update_hashes(request, max_hit_blocks * self.block_size)
        hit: list[int] = []
        for h in hashes:
            bid = self.cached_blocks.get(h)
            if bid is None:
                break
            hit.append(bid)
        num_hit_tokens = len(hit) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_hit_tokens
        return hit, num_hit_tokens

    def can_allocate(self, request: "Request", num_new_tokens: int, new_computed_blocks: list[int] = ()) -> bool:
        num_total = request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        needed = self.blocks_needed(num_total) - len(request.block_ids) - len(new_computed_blocks)
        revived = sum(1 for b in new_computed_blocks if self.blocks[b].ref_cnt == 0)
        return max(needed, 0) <= len(self._free) - revived

    def allocate_slots(
        self,
        request: "Request",
        num_new_tokens: int,
        new_computed_blocks: list[int] | tuple[int, ...] = (),
    ) -> list[int] | None:
        """Grow the request's block table to hold its computed tokens, the prefix-cache hit
        ``new_computed_blocks`` (not yet counted in ``request.num_computed_tokens``) and
        ``num_new_tokens`` more. Returns the block ids appended to ``request.block_ids``, or None
        (and changes nothing) when there are not enough free blocks.
        """
        if not new_computed_blocks and (
            request.num_computed_tokens + num_new_tokens <= len(request.block_ids) * self.block_size
        ):
            return []  # the common decode step: the last block still has room
        if not self.can_allocate(request, num_new_tokens, new_computed_blocks):
            return None
        added: list[int] = []
        if new_computed_blocks:
            assert not request.block_ids, "prefix-cache hits only apply to a request without blocks"
            for bid in new_computed_blocks:
                self._touch(bid)
                added.append(bid)
            self.num_cached_blocks[request.request_id] = len(new_computed_blocks)
        request.block_ids.extend(added)
        num_total = request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        for _ in range(self.blocks_needed(num_total) - len(request.block_ids)):
            bid = self._pop_free()
            request.block_ids.append(bid)
            added.append(bid)
        return added

    def _touch(self, block_id: int) -> None:
        blk = self.blocks[block_id]
        if blk.ref_cnt == 0:
            del self._free[block_id]
        blk.ref_cnt += 1

    def _pop_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        blk = self.blocks[bid]
        if blk.block_hash is not None:  # evict its prefix-cache entry
            if self.cached_blocks.get(blk.block_hash) == bid:
                del self.cached_blocks[blk.block_hash]
            blk.block_hash = None
        blk.ref_cnt = 1
        return bid

    def free(self, request: "Request") -> None:
        """Drop the request's references, tail block first (so tail blocks are evicted first)."""
        for bid in reversed(request.block_ids):
            blk = self.blocks[bid]
            blk.ref_cnt -= 1
            assert blk.ref_cnt >= 0, f"block {bid} freed twice"
            if blk.ref_cnt == 0:
                self._free[bid] = None
        request.block_ids = []
        self.num_cached_blocks.pop(request.request_id, None)

    # ---- caching ---------------------------------------------------------------------------

    def cache_full_blocks(self, request: "Request", num_computed_tokens: int) -> None:
        """Register the request's blocks that are full and computed in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        start = self.num_cached_blocks.get(request.request_id, 0)
        if num_computed_tokens < (start + 1) * self.block_size:
            return  # no block filled since the last call: the per-step common case
        if request.is_pooling:
            return
        num_full = min(num_computed_tokens, request.num_tokens, len(request.block_ids) * self.block_size)
        num_full //= self.block_size
        if num_full <= start:
            return
        hashes = self._update_hashes(request, num_full * self.block_size)
        for i in range(start, num_full):
            blk = self.blocks[request.block_ids[i]]
            h = hashes[i]
            # Another block may already hold this content (two equal prompts in one step);
            # the first one stays the cached copy, this one stays private.
            if blk.block_hash is None and h not in self.cached_blocks:
                blk.block_hash = h
                self.cached_blocks[h] = blk.block_id
        self.num_cached_blocks[request.request_id] = num_full

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block. Refused (False) while any block is held by a request."""
        if len(self._free) != self.num_blocks:
            return False
        self.cached_blocks.clear()
        for blk in self.blocks:
            blk.block_hash = None
        return True
