"""Hypothesis without its per-example deadline: the suite runs in parallel (pytest-xdist) on
shared machines, where a slow example says nothing about the property under test (and no
test here asserts a speed)."""

from hypothesis import settings

settings.register_profile("lb", deadline=None)
settings.load_profile("lb")
