"""BlockManager: exact block ids, ref counts, LRU eviction, chained hashes, prefix-cache caps."""

from __future__ import annotations

import pytest

from distllm.core.block_manager import BlockManager
from distllm.core.prefix_hash import hash_block_chain, hash_block_tokens
from distllm.core.request import Request
from distllm.params import PoolingParams, SamplingParams


def req(rid: str, tokens: list[int], **sp) -> Request:
    return Request(rid, list(tokens), sampling_params=SamplingParams(**sp))


def refs(bm: BlockManager) -> list[int]:
    return [b.ref_cnt for b in bm.blocks]


def compute(bm: BlockManager, r: Request, n: int, hit: list[int] = ()) -> list[int]:
    """Allocate for n new tokens, mark them computed and cache the full blocks (as a step does)."""
    added = bm.allocate_slots(r, n, hit)
    assert added is not None
    r.num_computed_tokens += len(hit) * bm.block_size + n
    bm.cache_full_blocks(r, r.num_computed_tokens)
    return added


def assert_all_free(bm: BlockManager) -> None:
    assert bm.num_free_blocks == bm.num_blocks
    assert refs(bm) == [0] * bm.num_blocks
    assert bm.usage == 0.0


def test_allocation_order_and_free_queue():
    bm = BlockManager(10, 4, enable_prefix_caching=False)
    r1, r2 = req("a", range(10)), req("b", range(5))
    assert bm.allocate_slots(r1, 10) == [0, 1, 2]
    assert bm.allocate_slots(r2, 5) == [3, 4]
    assert r1.block_ids == [0, 1, 2] and r2.block_ids == [3, 4]
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(0.5)
    # Growing within the last block allocates nothing; crossing a boundary allocates one.
    r1.num_computed_tokens = 10
    assert bm.allocate_slots(r1, 2) == []
    assert bm.allocate_slots(r1, 3) == [5]
    bm.free(r1)  # tail first: 5, 2, 1, 0 go to the back of the queue in that order
    assert bm.free_block_ids() == [6, 7, 8, 9, 5, 2, 1, 0]
    assert r1.block_ids == []
    r3 = req("c", range(8))
    assert bm.allocate_slots(r3, 8) == [6, 7]
    bm.free(r2)
    bm.free(r3)
    assert bm.free_block_ids() == [8, 9, 5, 2, 1, 0, 4, 3, 7, 6]
    assert_all_free(bm)


def test_allocation_is_all_or_nothing():
    bm = BlockManager(3, 4, enable_prefix_caching=False)
    r1, r2 = req("a", range(8)), req("b", range(8))
    assert bm.allocate_slots(r1, 8) == [0, 1]
    assert bm.allocate_slots(r2, 8) is None
    assert r2.block_ids == [] and bm.num_free_blocks == 1
    assert bm.allocate_slots(r2, 4) == [2]
    bm.free(r1)
    bm.free(r2)
    assert_all_free(bm)


def test_shared_prefix_ref_counts():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    r1 = req("a", range(10))
    assert compute(bm, r1, 10) == [0, 1, 2]
    # Blocks 0 and 1 are full and computed: cached. Block 2 holds 2 tokens: not cached.
    assert [b.block_hash is not None for b in bm.blocks[:3]] == [True, True, False]
    r2 = req("b", list(range(8)) + [50, 51, 52])
    hit, n = bm.get_computed_blocks(r2)
    assert (hit, n) == ([0, 1], 8)
    assert bm.allocate_slots(r2, 3, hit) == [0, 1, 3]
    r2.num_computed_tokens = 11
    assert refs(bm)[:4] == [2, 2, 1, 1]
    assert bm.prefix_cache_queries == 11 and bm.prefix_cache_hits == 8
    bm.free(r1)
    assert refs(bm)[:4] == [1, 1, 0, 1]
    assert bm.free_block_ids() == [4, 5, 6, 7, 2]
    bm.free(r2)
    assert bm.free_block_ids() == [4, 5, 6, 7, 2, 3, 1, 0]
    assert_all_free(bm)


def test_free_cached_blocks_are_revived_and_evicted_lru_tail_first():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    r1 = req("a", range(13))
    assert compute(bm, r1, 13) == [0, 1, 2, 3]
    bm.free(r1)
    assert bm.free_block_ids() == [3, 2, 1, 0]
    assert len(bm.cached_blocks) == 3  # blocks 0, 1, 2 (3 holds one token)
    # A new request takes 2 blocks from the front: 3 (uncached), then 2 (cached: evicted).
    other = req("x", [99] * 8)
    assert bm.allocate_slots(other, 8) == [3, 2]
    assert bm.blocks[2].block_hash is None and len(bm.cached_blocks) == 2
    # The prefix 0, 1 survives in the free queue and is revived from it.
    r2 = req("b", range(13))
    hit, n = bm.get_computed_blocks(r2)
    assert (hit, n) == ([0, 1], 8)
    assert bm.can_allocate(r2, 5, hit) is False  # reviving 2 hits leaves 0 free, 2 more needed
    assert bm.allocate_slots(r2, 5, hit) is None
    assert bm.free_block_ids() == [1, 0] and refs(bm) == [0, 0, 1, 1]
    bm.free(other)
    assert bm.free_block_ids() == [1, 0, 2, 3]
    assert bm.allocate_slots(r2, 5, hit) == [0, 1, 2, 3]
    assert refs(bm) == [1, 1, 1, 1] and bm.free_block_ids() == []
    bm.free(r2)
    assert_all_free(bm)


def test_hash_chain():
    a = hash_block_tokens(None, [1, 2, 3, 4], salt=b"s1")
    assert a == hash_block_tokens(None, (1, 2, 3, 4), salt="s1")  # deterministic, str == bytes
    assert a != hash_block_tokens(None, [1, 2, 3, 4], salt=b"s2")
    assert a != hash_block_tokens(None, [1, 2, 3, 5], salt=b"s1")
    assert a != hash_block_tokens(None, [1, 2, 3, 4], ("tenant",), salt=b"s1")
    b = hash_block_tokens(a, [5, 6, 7, 8])
    assert b != hash_block_tokens(a + 1, [5, 6, 7, 8])
    assert isinstance(a, int) and 0 <= a < 2**63
    chain = hash_block_chain(list(range(1, 10)), 4, salt=b"s1")
    assert chain == [a, b]
    assert hash_block_chain(list(range(1, 13)), 4, chain, salt=b"s1")[:2] == chain


def test_salt_and_cache_salt_separate_caches():
    bm1 = BlockManager(4, 4, True, hash_salt=b"engine-1")
    bm2 = BlockManager(4, 4, True, hash_salt=b"engine-2")
    r1, r2 = req("a", range(9)), req("b", range(9))
    compute(bm1, r1, 9)
    compute(bm2, r2, 9)
    assert r1.block_hashes != r2.block_hashes
    # Same engine, different per-request cache salt: no hit.
    r3 = req("c", range(9))
    r3.cache_salt = "user-7"
    assert bm1.get_computed_blocks(r3) == ([], 0)
    r4 = req("d", range(9))
    assert bm1.get_computed_blocks(r4) == ([0, 1], 8)
    bm1.free(r1)
    bm2.free(r2)
    assert_all_free(bm1)
    assert_all_free(bm2)


def test_hit_capped_below_num_tokens():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    r1 = req("a", range(12))
    compute(bm, r1, 12)
    assert len(bm.cached_blocks) == 3
    # 8 identical tokens: the last one must be computed, so only one block (4 tokens) hits.
    assert bm.get_computed_blocks(req("b", range(8))) == ([0], 4)
    assert bm.get_computed_blocks(req("c", range(9))) == ([0, 1], 8)
    assert bm.get_computed_blocks(req("d", range(12))) == ([0, 1], 8)
    assert bm.get_computed_blocks(req("e", range(13))) == ([0, 1, 2], 12)
    assert bm.get_computed_blocks(req("f", [0, 1, 2, 3, 9, 9, 9, 9, 9])) == ([0], 4)
    assert bm.get_computed_blocks(req("g", [7] + list(range(1, 12)))) == ([], 0)
    bm.free(r1)
    assert_all_free(bm)


def test_prompt_logprobs_and_pooling_skip_lookup():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    r1 = req("a", range(9))
    compute(bm, r1, 9)
    assert bm.get_computed_blocks(req("b", range(9), prompt_logprobs=1)) == ([], 0)
    pool = Request("p", list(range(9)), pooling_params=PoolingParams())
    assert bm.get_computed_blocks(pool) == ([], 0)
    compute(bm, pool, 9)
    assert len(bm.cached_blocks) == 2  # pooling blocks are never registered
    bm.free(pool)
    bm.free(r1)
    assert_all_free(bm)


def test_duplicate_content_keeps_first_cached_copy():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    r1, r2 = req("a", range(5)), req("b", range(5))
    assert bm.allocate_slots(r1, 5) == [0, 1]
    assert bm.allocate_slots(r2, 5) == [2, 3]
    for r in (r1, r2):
        r.num_computed_tokens = 5
        bm.cache_full_blocks(r, 5)
    assert bm.cached_blocks == {r1.block_hashes[0]: 0}
    assert bm.blocks[2].block_hash is None
    bm.free(r1)
    bm.free(r2)
    assert_all_free(bm)


def test_reset_prefix_cache():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    r1 = req("a", range(9))
    compute(bm, r1, 9)
    assert bm.reset_prefix_cache() is False
    assert len(bm.cached_blocks) == 2
    bm.free(r1)
    assert bm.reset_prefix_cache() is True
    assert bm.cached_blocks == {} and all(b.block_hash is None for b in bm.blocks)
    assert bm.get_computed_blocks(req("b", range(9))) == ([], 0)
    assert_all_free(bm)


def test_prefix_caching_disabled_never_caches():
    bm = BlockManager(4, 4, enable_prefix_caching=False)
    r1 = req("a", range(9))
    compute(bm, r1, 9)
    assert bm.cached_blocks == {}
    assert bm.get_computed_blocks(req("b", range(9))) == ([], 0)
    bm.free(r1)
    assert_all_free(bm)
