"""The KV block pool: reference counts, prefix-cache hits, LRU eviction; and the scheduler starting after a hit."""

from __future__ import annotations

import pytest

from fitserve.server.engine.block_pool import NO_HIT, BlockPool
from fitserve.server.engine.config import EngineConfig
from fitserve.server.engine.scheduler import Scheduler, Sequence
from fitserve.server.engine.types import SamplingParams

BS = 4


def computed(pool: BlockPool, tokens: list[int], extra_blocks: int = 0) -> list[int]:
    """Allocate a sequence for `tokens`, register its full blocks as computed, and return its block table."""
    hit = pool.match(tokens, len(tokens) // BS)
    table = pool.allocate(hit, len(tokens) // BS - len(hit) + extra_blocks)
    pool.register(table, tokens, len(hit), len(tokens) // BS, hit.last_key)
    return table


def test_a_finished_prefix_is_found_again() -> None:
    pool = BlockPool(8, BS)
    tokens = list(range(12))
    table = computed(pool, tokens)
    pool.free(table)
    assert pool.num_free == 8 and pool.num_cached == 3
    hit = pool.match([*tokens, 99], 3)
    assert hit.blocks == tuple(table)
    assert pool.match(tokens, 2).blocks == tuple(table[:2])  # capped by the caller
    assert pool.match([0, 1, 2, 7, *tokens[4:]], 3) == NO_HIT  # first block differs: nothing after it counts


def test_equal_tokens_after_a_different_prefix_do_not_match() -> None:
    pool = BlockPool(8, BS)
    pool.free(computed(pool, [1, 1, 1, 1, 5, 5, 5, 5]))
    hit = pool.match([2, 2, 2, 2, 5, 5, 5, 5], 2)
    assert hit == NO_HIT


def test_shared_blocks_are_counted_per_user() -> None:
    pool = BlockPool(8, BS)
    tokens = list(range(8))
    first = computed(pool, tokens, extra_blocks=1)
    hit = pool.match(tokens, 2)
    second = pool.allocate(hit, 1)
    assert second[:2] == first[:2] and second[2] != first[2]
    pool.free(first)
    assert pool.num_cached == 0  # still used by the second sequence
    pool.free(second)
    assert pool.num_cached == 2 and pool.num_free == 8


def test_fresh_blocks_come_from_free_ones_first_then_the_oldest_cached() -> None:
    pool = BlockPool(4, BS)
    old = computed(pool, [1] * 4)
    new = computed(pool, [2] * 4)
    pool.free(old)
    pool.free(new)
    taken = pool.allocate(NO_HIT, 2)
    assert set(taken).isdisjoint(old + new)  # the two never-registered blocks
    assert pool.num_cached == 2
    pool.allocate(NO_HIT, 1)  # evicts the least recently freed prefix: [1]*4
    assert pool.match([1] * 4, 1) == NO_HIT
    assert pool.match([2] * 4, 1).blocks == tuple(new)


def test_a_hit_on_a_cached_block_is_not_also_counted_as_free() -> None:
    pool = BlockPool(2, BS)
    pool.free(computed(pool, [3] * 4))
    hit = pool.match([3] * 4 + [9], 1)
    assert len(hit) == 1
    assert pool.can_allocate(hit, 1) and not pool.can_allocate(hit, 2)
    assert len(pool.allocate(hit, 1)) == 2


def test_disabled_caching_never_hits() -> None:
    pool = BlockPool(8, BS, enable_caching=False)
    tokens = list(range(8))
    pool.free(computed(pool, tokens))
    assert pool.match(tokens, 2) == NO_HIT and pool.num_cached == 0


def scheduler(enable: bool = True) -> Scheduler:
    return Scheduler(
        EngineConfig(
            served_model_name="t",
            max_model_len=256,
            kv_capacity_tokens=256,
            max_prefill_tokens=64,
            block_size_tokens=16,
            enable_prefix_caching=enable,
        )
    )


def run(s: Scheduler, seq: Sequence) -> list[int]:
    """Run one sequence alone to completion; returns the prefill token count of each step."""
    s.add(seq)
    prefill = []
    while s.has_work:
        batch = s.schedule()
        prefill.append(batch.num_prefill_tokens)
        s.postprocess(batch, [7] * batch.num_sampled)
    return prefill


def seq(prompt: list[int], max_tokens: int = 3) -> Sequence:
    return Sequence(f"s{id(prompt)}", list(prompt), len(prompt), SamplingParams(max_tokens=max_tokens), 0.0)


@pytest.mark.parametrize(("enable", "expected_second"), [(True, 40 - 32), (False, 40)])
def test_a_second_request_with_the_same_prefix_prefills_only_the_rest(enable: bool, expected_second: int) -> None:
    s = scheduler(enable)
    system = list(range(100, 132))  # two full blocks
    assert run(s, seq(system + [1] * 8))[0] == 40
    second = seq(system + [2] * 8)
    assert run(s, second)[0] == expected_second
    assert second.output_token_ids == [7, 7, 7]
    assert s.allocator.hit_tokens_total == (32 if enable else 0)


def test_an_identical_prompt_still_computes_its_last_token() -> None:
    s = scheduler()
    prompt = list(range(100, 132))  # exactly two blocks
    run(s, seq(prompt))
    assert run(s, seq(prompt))[0] == 16  # the last block is recomputed so the step has logits to sample


def test_kv_gauges_count_a_shared_prefix_once() -> None:
    s = scheduler()
    system = list(range(100, 132))  # two full blocks
    run(s, seq([*system, 1]))  # leaves the two system blocks in the cache
    a, b = seq([*system, 2], max_tokens=8), seq([*system, 3], max_tokens=8)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    s.postprocess(batch, [7] * batch.num_sampled)
    assert a.block_table[:2] == b.block_table[:2]
    # each computed 33 tokens (32 cached + 1); the 32 shared ones count once: 32 + 1 + 1
    assert s.kv_used_tokens == 34
    # reservations: 3 blocks each (33 + 8 tokens), two of them shared -> 4 distinct blocks
    assert s.kv_reserved_tokens == 4 * 16


def test_block_keys_chain_sha256_digests_of_the_parent_key_and_the_token_ids() -> None:
    """Issue 13 item 8: a block's key is SHA-256(parent key + token ids as int64), not Python's `hash()` of a
    tuple, so nobody can craft a second prefix with the same key and read another request's KV."""
    import hashlib
    import struct

    from fitserve.server.engine.block_pool import ROOT_KEY, block_key

    first = block_key(ROOT_KEY, [1, 2, 3, 4])
    second = block_key(first, [5, 6, 7, 8])
    assert first == hashlib.sha256(struct.pack("<4q", 1, 2, 3, 4)).digest()
    assert second == hashlib.sha256(first + struct.pack("<4q", 5, 6, 7, 8)).digest()
    assert block_key(block_key(ROOT_KEY, [9, 9, 9, 9]), [5, 6, 7, 8]) != second  # same tokens, other prefix
    # ids that Python's hash() folds together (hash(2**61 - 1) == hash(0)) still get different keys
    assert hash((2**61 - 1, 1, 2, 3)) == hash((0, 1, 2, 3))
    assert block_key(ROOT_KEY, [2**61 - 1, 1, 2, 3]) != block_key(ROOT_KEY, [0, 1, 2, 3])
