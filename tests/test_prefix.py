"""PREFIX_AWARE: the block hash chain, the LRU index and the bounded-load ordering (pure)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from test_strategies import FAST, Node

from lb.routing.prefix import BLOCK_BYTES, PrefixIndex, blocks
from lb.routing.strategies import PrefixHint, Strategy, order, prefix_aware, rendezvous

texts = st.text(max_size=700)
roles = st.sampled_from(["system", "user", "assistant", "tool"])
contents = st.one_of(
    texts,
    st.lists(
        st.one_of(
            st.builds(lambda t: {"type": "text", "text": t}, texts),
            st.just({"type": "image_url", "image_url": {"url": "data:,x"}}),
        ),
        max_size=3,
    ),
)
messages = st.builds(lambda r, c: {"role": r, "content": c}, roles, contents)
conversations = st.lists(messages, min_size=1, max_size=6)
max_blocks = st.integers(1, 20)


def chat(msgs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"model": "m", "messages": list(msgs)}


@FAST
@given(conversations, max_blocks)
def test_equal_prefixes_give_equal_chains(msgs: list[dict[str, Any]], limit: int) -> None:
    copy = [dict(m) for m in msgs]
    chain = blocks(chat(msgs), "chat", limit)
    assert chain == blocks(chat(copy), "chat", limit)
    assert 1 <= len(chain) <= limit
    assert all(len(h) == 8 for h in chain)


@FAST
@given(conversations, conversations, max_blocks)
def test_a_longer_conversation_extends_its_prefix_chain(
    first: list[dict[str, Any]], more: list[dict[str, Any]], limit: int
) -> None:
    short = blocks(chat(first), "chat", limit)
    long = blocks(chat(first + more), "chat", limit)
    assert long[: len(short)] == short
    assert len(long) >= len(short)


@FAST
@given(messages, messages, conversations)
def test_a_different_first_message_gives_a_different_first_block(
    a: dict[str, Any], b: dict[str, Any], rest: list[dict[str, Any]]
) -> None:
    def text(m: dict[str, Any]) -> str:
        c = m["content"]
        if isinstance(c, str):
            return c
        return "\n".join(p["text"] for p in c if "text" in p)

    head_a = (a["role"], text(a)[:BLOCK_BYTES // 8])
    head_b = (b["role"], text(b)[:BLOCK_BYTES // 8])
    chain_a = blocks(chat([a, *rest]), "chat", 4)
    chain_b = blocks(chat([b, *rest]), "chat", 4)
    if head_a != head_b:
        assert chain_a[0] != chain_b[0]


def test_text_parts_count_and_other_parts_do_not() -> None:
    plain = chat([{"role": "user", "content": "hello"}])
    parts = chat([{"role": "user", "content": [
        {"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "x"}},
    ]}])
    assert blocks(plain, "chat", 4) == blocks(parts, "chat", 4)
    other_role = chat([{"role": "system", "content": "hello"}])
    assert blocks(plain, "chat", 4) != blocks(other_role, "chat", 4)


def test_long_messages_are_cut_into_blocks_and_capped() -> None:
    body = chat([{"role": "system", "content": "x" * (BLOCK_BYTES * 3)}])
    assert len(blocks(body, "chat", 16)) == 4  # 3 * 256 bytes of text plus the JSON around it
    assert len(blocks(body, "chat", 2)) == 2
    huge = chat([{"role": "user", "content": "y" * 10_000_000}])
    assert len(blocks(huge, "chat", 16)) == 16


def test_completions_hash_the_prompt_and_embeddings_nothing() -> None:
    a = blocks({"prompt": "once upon a time"}, "completion", 4)
    assert a and a == blocks({"prompt": "once upon a time"}, "completion", 4)
    assert a != blocks({"prompt": "once upon a tide"}, "completion", 4)
    assert blocks({"prompt": [1, 2, 3]}, "completion", 4)
    assert blocks({"input": "text"}, "embedding", 4) == ()
    assert blocks({"messages": "nonsense"}, "chat", 4) == ()


chains = st.lists(st.binary(min_size=8, max_size=8), min_size=1, max_size=20)


@FAST
@given(st.integers(1, 30), st.lists(st.tuples(chains, st.sampled_from("abc")), max_size=30))
def test_the_index_stays_bounded(size: int, records: list[tuple[list[bytes], str]]) -> None:
    index = PrefixIndex(size)
    for chain, key in records:
        index.record(chain, key)
        assert len(index) <= size
    if records:
        chain, key = records[-1]
        # The most recent record's last block is never the one evicted.
        assert index.match(chain[-1:], {"a", "b", "c"}) == key


def test_the_index_matches_the_longest_prefix_a_candidate_owns() -> None:
    index = PrefixIndex(100)
    index.record([b"1" * 8], "a")
    index.record([b"1" * 8, b"2" * 8], "b")
    index.record([b"3" * 8], "c")
    chain = [b"1" * 8, b"2" * 8, b"9" * 8]
    assert index.match(chain, {"a", "b", "c"}) == "b"
    index.record([b"1" * 8], "a")  # the shared first block moves to a; block 2 stays b's
    assert index.match(chain, {"a", "b"}) == "b"
    assert index.match(chain, {"a", "c"}) == "a"
    assert index.match(chain, {"c"}) is None
    assert index.match([b"8" * 8], {"a", "b", "c"}) is None


def test_the_least_recently_used_entry_goes_first() -> None:
    index = PrefixIndex(2)
    index.record([b"1" * 8], "a")
    index.record([b"2" * 8], "b")
    assert index.match([b"1" * 8], {"a"}) == "a"
    index.record([b"1" * 8], "a")  # used again: 2 is now the oldest
    index.record([b"3" * 8], "c")
    assert index.match([b"2" * 8], {"b"}) is None
    assert index.match([b"1" * 8], {"a"}) == "a"


def nodes(*inflight: int, capacity: int = 0) -> list[Node]:
    return [Node(f"10.0.0.{i}:8000", n, capacity) for i, n in enumerate(inflight)]


loads = st.lists(st.integers(0, 20), min_size=2, max_size=8)


@FAST
@given(loads, st.integers(0, 7), st.sampled_from([0, 1, 4, 16]), st.floats(0.0, 2.0))
def test_bounded_load_keeps_the_owner_or_spills_by_rendezvous(
    inflight: list[int], pick: int, capacity: int, eps: float
) -> None:
    cands = nodes(*inflight, capacity=capacity)
    owner = cands[pick % len(cands)]
    got = prefix_aware(cands, 0, PrefixHint(owner.key, b"x" * 8, eps))
    assert sorted(c.key for c in got) == sorted(c.key for c in cands)
    unit = capacity or 1
    smoothed = [(c.inflight + 1) / unit for c in cands]
    bound = (1 + eps) * sum(smoothed) / len(smoothed)
    if (owner.inflight + 1) / unit > bound:
        spills = [
            c for c in rendezvous(cands, (b"x" * 8).hex())
            if c is not owner and (c.inflight + 1) / unit <= bound
        ]
        if spills:  # the prefix's next node by rendezvous that is not over the bound
            assert got[0] is spills[0]
        else:
            assert got[0].inflight == min(inflight)  # least loaded
    else:
        assert got[0] is owner
        assert [c.inflight for c in got[1:]] == sorted(c.inflight for c in got[1:])


def test_a_busy_owner_is_passed_over() -> None:
    cands = nodes(6, 0, 1)
    hint = PrefixHint(cands[0].key, b"x" * 8, 0.25)
    got = order(Strategy.PREFIX_AWARE, cands, counter=0, rng=random.Random(0), prefix=hint)
    assert got[0] is next(c for c in rendezvous(cands, (b"x" * 8).hex()) if c is not cands[0])
    idle = nodes(0, 0, 0)
    assert prefix_aware(idle, 5, PrefixHint(idle[0].key, b"x" * 8, 0.25))[0] is idle[0]
    # A wider bound keeps it.
    assert prefix_aware(cands, 0, PrefixHint(cands[0].key, b"x" * 8, 10.0))[0] is cands[0]


@FAST
@given(st.binary(min_size=8, max_size=8), st.permutations(range(5)), st.integers(0, 10**6))
def test_a_new_prefix_goes_where_rendezvous_says_whatever_the_order(
    first: bytes, perm: list[int], counter: int
) -> None:
    cands = nodes(0, 0, 0, 0, 0)
    shuffled = [cands[i] for i in perm]
    got = prefix_aware(shuffled, counter, PrefixHint(None, first, 0.25))
    assert got[0] is rendezvous(cands, first.hex())[0]


def test_no_prompt_or_no_hint_is_least_loaded() -> None:
    cands = nodes(3, 1, 2)
    assert prefix_aware(cands, 0, None)[0] is cands[1]
    assert prefix_aware(cands, 0, PrefixHint(None, b"", 0.25))[0] is cands[1]
