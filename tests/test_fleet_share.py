"""The split of a fleet-wide cap between instances (pure)."""

from hypothesis import given
from hypothesis import strategies as st

from lb.cluster.fleet import share

ids = st.lists(st.text("abcdef0123456789", min_size=1, max_size=8), min_size=1, max_size=12,
               unique=True)


@given(st.integers(min_value=1, max_value=500), ids, st.text(min_size=1, max_size=20))
def test_shares_add_up_to_the_cap_and_are_even(cap: int, instances: list[str], node: str) -> None:
    instances = sorted(instances)
    parts = [share(cap, instances, me, node) for me in instances]
    assert all(part is not None for part in parts)
    counted = [part for part in parts if part is not None]
    assert sum(counted) == cap
    assert max(counted) - min(counted) <= 1


@given(ids, st.text(min_size=1, max_size=20))
def test_no_cap_is_no_cap(instances: list[str], node: str) -> None:
    assert all(share(0, sorted(instances), me, node) is None for me in instances)


def test_an_unknown_instance_gets_nothing() -> None:
    assert share(4, ["a", "b"], "c", "n:1") == 0


def test_small_caps_spread_over_instances_by_node() -> None:
    instances = [f"i{n}" for n in range(4)]
    holders = set()
    for port in range(40):
        parts = [share(1, instances, me, f"node:{port}") for me in instances]
        assert sorted(parts) == [0, 0, 0, 1]
        holders.add(parts.index(1))
    assert holders == {0, 1, 2, 3}  # not always the same instance
