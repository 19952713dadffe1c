"""Preferences an operator can change at run time (`POST /v1/admin/prefs`), shared by the fleet:
the preferred-model order and per-node concurrency caps. Pure values and validation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class Prefs:
    preferred_models: tuple[str, ...] = ()
    maxconn: Mapping[str, int] = attrs.field(factory=dict)  # host:port -> cap (0 = no cap)
    version: int = 0  # a change on any instance bumps it; the highest wins

    def to_json(self) -> dict[str, Any]:
        return {
            "preferred_models": list(self.preferred_models),
            "maxconn": dict(self.maxconn),
            "version": self.version,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Prefs:
        return cls(
            preferred_models=tuple(str(m) for m in data.get("preferred_models", ())),
            maxconn={str(k): int(v) for k, v in dict(data.get("maxconn", {})).items()},
            version=int(data.get("version", 0)),
        )


def apply_update(current: Prefs, body: Any) -> Prefs:
    """The prefs after a partial update; raises ValueError naming the bad field.

    `preferred_models` replaces the list (a JSON array or a comma/semicolon string);
    `maxconn` merges per node, and a null cap removes that node's override."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = set(body) - {"preferred_models", "maxconn"}
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
    return Prefs(preferred, maxconn, current.version + 1)
