"""What every test module shares: Hypothesis without its per-example deadline (the suite runs
in parallel with pytest-xdist on shared machines, where a slow example says nothing about the
property under test, and no test here asserts a speed), and a private redis-server."""

from collections.abc import Iterator

import pytest
from harness import RedisServer
from hypothesis import settings

settings.register_profile("lb", deadline=None)
settings.load_profile("lb")


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port, for one test (which may stop and restart it)."""
    with RedisServer() as server:
        yield server
