"""Preferences an operator can change at run time (`POST /v1/admin/prefs`), shared by the fleet:
the preferred-model order, per-node concurrency caps and the blue/green traffic split
(`PUT /v1/admin/traffic-split`). Pure values and validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from lb.routing.split import parse_weights


@attrs.frozen
class Prefs:
    preferred_models: tuple[str, ...] = ()
    maxconn: Mapping[str, int] = attrs.field(factory=dict)  # host:port -> cap (0 = no cap)
    version: int = 0  # a change on any instance bumps it; the highest wins
    # Blue/green: label value -> weight (empty: no split). Last, so positional uses stand.
    traffic_split: Mapping[str, float] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "preferred_models": list(self.preferred_models),
            "maxconn": dict(self.maxconn),
            "version": self.version,
        }
        if self.traffic_split:  # absent means none (and instances that predate it agree)
            data["traffic_split"] = dict(self.traffic_split)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prefs:
        return cls(
            preferred_models=tuple(str(m) for m in data.get("preferred_models", ())),
            maxconn={str(k): int(v) for k, v in dict(data.get("maxconn", {})).items()},
            version=int(data.get("version", 0)),
            traffic_split=parse_weights(data.get("traffic_split")),
        )


def apply_update(current: Prefs, body: Any) -> Prefs:
    """The prefs after a partial update; raises ValueError naming the bad field.

    `preferred_models` replaces the list (a JSON array or a comma/semicolon string);
    `maxconn` merges per node, and a null cap removes that node's override; `traffic_split`
    replaces the split (`{"blue": 90, "green": 10}` or `"blue=90,green=10"`; null or `{}`:
    none)."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(body) - {"preferred_models", "maxconn", "traffic_split"}
    if unknown:
        raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
    preferred = current.preferred_models
    if "preferred_models" in body:
        value = body["preferred_models"]
        if isinstance(value, str):
            value = value.replace(";", ",").split(",")
        if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
            raise ValueError("preferred_models must be a list of model ids")
        preferred = tuple(m.strip() for m in value if m.strip())
    maxconn = dict(current.maxconn)
    if "maxconn" in body:
        caps = body["maxconn"]
        if not isinstance(caps, dict):
            raise ValueError("maxconn must be an object of host:port -> cap")
        for key, cap in caps.items():
            if ":" not in key:
                raise ValueError(f"maxconn key {key!r} must be host:port")
            if cap is None:
                maxconn.pop(key, None)
            elif isinstance(cap, int) and not isinstance(cap, bool) and cap >= 0:
                maxconn[key] = cap
            else:
                raise ValueError(f"maxconn[{key!r}] must be a whole number >= 0 or null")
    split = current.traffic_split
    if "traffic_split" in body:
        try:
            split = parse_weights(body["traffic_split"])
        except ValueError as exc:
            raise ValueError(f"traffic_split: {exc}") from None
    return Prefs(preferred, maxconn, current.version + 1, split)
