"""BlockPool: allocation, reference counts, the prefix cache and LRU eviction (plain Python)."""
import pytest

from qwen_int4.engine.block_pool import BlockPool, NoFreeBlocks, hash_block


def test_allocate_and_free_count_blocks():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert len(set(a)) == 3 and pool.num_free == 1 and pool.num_used == 3
    assert all(pool.ref_counts[b] == 1 for b in a)
    with pytest.raises(NoFreeBlocks, match="asked for 2 KV blocks, 1 free of 4"):
        pool.allocate(2)
    pool.free(a)
    assert pool.num_free == 4 and pool.num_used == 0


def test_double_free_is_an_error():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(ValueError, match=f"block {b} freed more times"):
        pool.free([b])


def test_shared_block_is_free_only_after_its_last_holder():
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    h = hash_block(None, [1, 2, 3])
    pool.cache(b, h)
    assert pool.lookup(h) == b
    pool.take(b)  # a second sequence with the same prefix
    assert pool.ref_counts[b] == 2
    pool.free([b])
    assert pool.num_free == 2 and pool.ref_counts[b] == 1
    pool.free([b])
    assert pool.num_free == 3


def test_freed_cached_block_is_reused_until_evicted():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    h = hash_block(None, [7, 8])
    pool.cache(b, h)
    pool.free([b])
    assert pool.lookup(h) == b and pool.num_cached == 1  # still cached while free
    pool.take(b)  # revived from the free queue
    assert pool.num_free == 1 and pool.ref_counts[b] == 1
    pool.free([b])
    pool.allocate(2)  # the pool runs short: the cached block is handed out and forgotten
    assert pool.lookup(h) is None and pool.num_cached == 0


def test_eviction_is_least_recently_freed_first():
    pool = BlockPool(3)
    a, b, _ = pool.allocate(3)
    ha, hb = hash_block(None, [1]), hash_block(None, [2])
    pool.cache(a, ha)
    pool.cache(b, hb)
    pool.free([b])  # freed first: evicted first
    pool.free([a])
    (got,) = pool.allocate(1)
    assert got == b and pool.lookup(hb) is None and pool.lookup(ha) == a


def test_cache_keeps_the_first_block_of_a_content():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    h = hash_block(None, [5, 6])
    pool.cache(a, h)
    pool.cache(b, h)  # same content computed twice: the first stays the cached one
    assert pool.lookup(h) == a and pool.block_hash[b] is None


def test_prefix_caching_off_caches_nothing():
    pool = BlockPool(2, enable_prefix_caching=False)
    (a,) = pool.allocate(1)
    pool.cache(a, hash_block(None, [1]))
    assert pool.num_cached == 0


def test_hash_depends_on_parent_tokens_and_salt():
    root = hash_block(None, [1, 2])
    assert hash_block(None, [1, 2]) == root
    assert hash_block(None, [2, 1]) != root
    assert hash_block(None, [1, 2], salt="ntk=3.0") != root  # keys rotated with another NTK alpha
    child = hash_block(root, [3, 4])
    assert child != hash_block(hash_block(None, [9, 9]), [3, 4])  # same block, different prefix
    assert hash_block(None, [1 << 40]) != hash_block(None, [0])  # ids are not truncated


def test_pool_needs_a_block():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)
