"""Test doubles that ship with lb: the mock upstream LLM node (tests, benchmarks, demo)."""

from lb.testing.faults import FaultSpec, FaultSpecError, parse_fault
from lb.testing.mock import MockNode, MockStats

__all__ = ["FaultSpec", "FaultSpecError", "MockNode", "MockStats", "parse_fault"]
