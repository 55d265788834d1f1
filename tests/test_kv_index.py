"""The KV index from vLLM's KV events: blocks named by content, removals, clears, gaps, bounds."""

from __future__ import annotations

from typing import Any

import pytest

from lylm._kv_index import KVIndex
from lylm.balancers._prefix_table import block_hashes

BS = 4
G = 2  # granules: two per block


def stored(engine_hashes: list[int], tokens: list[int], parent: int | None = None, **more: Any) -> dict[str, Any]:
    return {"type": "BlockStored", "block_hashes": engine_hashes, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": BS, "lora_id": None, "medium": "GPU", "lora_name": None, **more}


def removed(engine_hashes: list[int]) -> dict[str, Any]:
    return {"type": "BlockRemoved", "block_hashes": engine_hashes, "medium": "GPU"}


PROMPT = list(range(100, 114))  # 14 tokens: 3 full blocks of 4, and 2 more


def predicted(index: KVIndex, prompt: list[int] = PROMPT, instance: str = "a") -> int | None:
    return index.cached_tokens(instance, block_hashes(prompt, G, 64), len(prompt))


def test_stored_blocks_are_named_by_content_and_chained_through_parents() -> None:
    index = KVIndex(granule=G)
    # Two events, the second's parent the first's last block (the engine's hashes are its own).
    assert index.apply("a", 0, [stored([901], PROMPT[:4])])
    assert index.apply("a", 1, [stored([902, 903], PROMPT[4:12], parent=901)])
    assert index.blocks("a") == 3 and index.block_size("a") == BS
    assert predicted(index) == 12
    # A prompt that shares only the first block; another instance's (empty) cache holds nothing.
    assert predicted(index, PROMPT[:4] + [0] * 10) == 4
    index.open("b")
    assert predicted(index, instance="b") == 0


def test_at_most_all_but_the_last_token_is_cached() -> None:
    index = KVIndex(granule=G)
    index.apply("a", 0, [stored([1, 2, 3], PROMPT[:12])])
    assert predicted(index, PROMPT[:12]) == 8  # 12 tokens: vLLM computes the 12th itself
    assert predicted(index, PROMPT[:13]) == 12


def test_removed_and_cleared_blocks_are_forgotten() -> None:
    index = KVIndex(granule=G)
    index.apply("a", 0, [stored([1, 2, 3], PROMPT[:12])])
    index.apply("a", 1, [removed([2])])
    assert predicted(index) == 4  # the chain breaks at the second block
    index.apply("a", 2, [{"type": "AllBlocksCleared"}])
    assert index.blocks("a") == 0 and predicted(index) == 0


def test_two_engine_blocks_of_one_content_count_until_both_are_removed() -> None:
    index = KVIndex(granule=G)
    index.apply("a", 0, [stored([1], PROMPT[:4]), stored([7], PROMPT[:4])])
    index.apply("a", 1, [removed([1])])
    assert predicted(index) == 4
    index.apply("a", 2, [removed([7])])
    assert predicted(index) == 0


@pytest.mark.parametrize(
    "more",
    [{"lora_name": "adapter"}, {"extra_keys": [("salt",)]}, {"medium": "CPU"}, {"group_idx": 1}],
)
def test_blocks_a_plain_prompt_cannot_hit_are_not_indexed(more: dict[str, Any]) -> None:
    index = KVIndex(granule=G)
    index.apply("a", 0, [stored([1], PROMPT[:4], **more)])
    assert index.blocks("a") == 0 and index.skipped == 1


def test_a_block_whose_parent_was_never_seen_is_skipped() -> None:
    index = KVIndex(granule=G)
    index.apply("a", 0, [stored([5], PROMPT[4:8], parent=999)])
    assert index.blocks("a") == 0 and index.skipped == 1


def test_a_gap_applies_nothing_until_replayed_and_a_replayed_batch_counts_once() -> None:
    index = KVIndex(granule=G)
    assert index.apply("a", 0, [stored([1], PROMPT[:4])])
    assert not index.apply("a", 2, [stored([3], PROMPT[8:12], parent=2)])  # 1 is missing
    assert index.gaps == 1 and index.expected("a") == 1
    assert index.apply("a", 1, [stored([2], PROMPT[4:8], parent=1)])
    assert index.apply("a", 1, [stored([2], PROMPT[4:8], parent=1)])  # again: ignored
    assert index.apply("a", 2, [stored([3], PROMPT[8:12], parent=2)])
    assert predicted(index) == 12 and index.blocks("a") == 3


def test_a_first_batch_after_zero_is_a_gap() -> None:
    index = KVIndex(granule=G)
    assert not index.apply("a", 5, [])
    assert index.expected("a") == 0


def test_resync_forgets_the_blocks_and_goes_on_after_the_gap() -> None:
    index = KVIndex(granule=G)
    index.apply("a", 0, [stored([1], PROMPT[:4])])
    index.resync("a", 9)
    assert index.blocks("a") == 0 and index.expected("a") == 10 and index.resets == 1
    assert index.apply("a", 10, [stored([11], PROMPT[:4])])
    assert index.blocks("a") == 1
    # Blocks stored before the gap are not announced again: the index cannot tell (None),
    # until the engine's cache is cleared and known to be empty.
    assert predicted(index) is None
    assert index.apply("a", 11, [{"type": "AllBlocksCleared"}, stored([12], PROMPT[:4])])
    assert predicted(index) == 4


def test_the_cap_resets_an_instance_that_outgrows_it() -> None:
    index = KVIndex(granule=G, max_blocks=2)
    index.apply("a", 0, [stored([1, 2, 3], PROMPT[:12])])
    assert index.blocks("a") == 0 and index.resets == 1 and index.expected("a") == 1
    with pytest.raises(ValueError):
        KVIndex(max_blocks=0)


def test_drop_forgets_an_instance() -> None:
    index = KVIndex(granule=G)
    index.apply("a", 0, [stored([1], PROMPT[:4])])
    index.drop("a")
    assert index.instances() == [] and predicted(index) is None and index.expected("a") == 0


def test_an_instance_is_known_from_its_start_and_unknown_after_its_drop() -> None:
    index = KVIndex(granule=G)
    assert predicted(index) is None  # no stream: a balancer falls back
    index.open("a")
    assert predicted(index) == 0  # a new engine's cache is empty
    index.apply("a", 0, [stored([1, 2], PROMPT[:8])])
    assert predicted(index) == 8
    index.drop("a")
    assert predicted(index) is None


def test_granules_are_counted_in_whole_engine_blocks() -> None:
    index = KVIndex(granule=G)
    index.apply("a", 0, [stored([1], PROMPT[:4])])
    # The prompt shares the first block's first granule only: no whole block.
    other = PROMPT[:2] + [7, 7] + PROMPT[4:]
    assert predicted(index, other) == 0
    assert predicted(index) == 4
    assert index.cached_tokens("a", block_hashes(PROMPT, G, 1), len(PROMPT)) == 0  # hashed 2 tokens only


def test_an_engine_block_size_that_is_no_multiple_of_the_granule_is_not_indexed() -> None:
    index = KVIndex(granule=3)
    index.apply("a", 0, [stored([1], PROMPT[:4])])
    assert index.cached_tokens("a", block_hashes(PROMPT, 3, 64), len(PROMPT)) is None
    assert index.skipped == 1


@pytest.mark.parametrize("block_size, most", [(16, 250), (128, 1000)])
def test_a_block_costs_what_the_docs_say(block_size: int, most: int) -> None:
    import random
    import tracemalloc

    index = KVIndex()  # 16-token granules
    rng = random.Random(0)
    events = [{"type": "BlockStored", "block_hashes": [rng.getrandbits(63)], "parent_block_hash": None,
               "token_ids": [rng.randrange(50_000) for _ in range(block_size)], "block_size": block_size,
               "medium": "GPU"} for _ in range(5000)]  # fmt: skip
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for seq, event in enumerate(events):
            index.apply("a", seq, [event])
        per_block = (tracemalloc.get_traced_memory()[0] - before) / len(events)
    finally:
        tracemalloc.stop()
    assert index.blocks("a") == 5000
    assert per_block < most, per_block  # measured 178 and 716 bytes (the module's notes)
