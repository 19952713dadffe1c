"""Fleet-exact limits in Redis (filled in below)."""

from __future__ import annotations

from lb.policy.counters import Limits, Refusal, Ticket


class FleetLimits:
    up: bool = False
    instances: int = 1

    async def admit(self, token: str, limits: Limits, estimate: int) -> Ticket | Refusal | None:
        return None

    def settle(self, token: str, ticket: Ticket, tokens: int | None) -> None:
        pass

    def add_spend(self, token: str, spend: float) -> None:
        pass
