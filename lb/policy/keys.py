"""Virtual keys as data, pure: making and hashing them, and LiteLLM's key fields (`models`,
`rpm_limit`, `tpm_limit`, `max_parallel_requests`, `max_budget`, `budget_duration`, `expires` or
`duration`, `metadata`, `key_alias`) read from an admin request and written back.

Only the SHA-256 of a key is ever stored (its `token`, which is also its id in the admin API);
the key itself is shown once, when it is made.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

from lb.policy.counters import Limits
from lb.policy.limits import add_duration, next_reset, parse_duration

KEY_PREFIX = "sk-"
ALL_MODELS = frozenset({"all-proxy-models", "*"})  # LiteLLM's "every model" in `models`


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """A key's token: what is stored and what identifies it (a token passes through)."""
    if len(key) == 64 and not key.startswith(KEY_PREFIX):
        try:
            int(key, 16)
            return key.lower()
        except ValueError:
            pass
    return hashlib.sha256(key.encode()).hexdigest()


def key_name(key: str) -> str:
    """LiteLLM's `key_name`: enough of the key to recognise it, not to use it."""
    return f"{key[:3]}...{key[-4:]}"


@attrs.frozen
class KeyRecord:
    token: str  # sha256 of the key
    key_name: str = ""
    key_alias: str | None = None
    models: tuple[str, ...] = ()  # empty: every model
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    rpm_burst: int | None = None
    max_parallel_requests: int | None = None
    max_budget: float | None = None
    budget_duration: str | None = None
    budget_reset_at: float | None = None  # Unix seconds: the current period's end
    expires: float | None = None  # Unix seconds
    metadata: Mapping[str, Any] = attrs.field(factory=dict)
    created_at: float = 0.0
    spend: float = 0.0  # USD in the current budget period, as of loading

    @functools.cached_property
    def limits(self) -> Limits:
        return Limits(self.rpm_limit, self.tpm_limit, self.rpm_burst, self.max_parallel_requests)

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models or not ALL_MODELS.isdisjoint(self.models)

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    def to_json(self) -> dict[str, Any]:
        """What the admin API shows (never the key itself)."""
        return {
            "token": self.token,
            "key_name": self.key_name,
            "key_alias": self.key_alias,
            "models": list(self.models),
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "rpm_burst": self.rpm_burst,
            "max_parallel_requests": self.max_parallel_requests,
            "max_budget": self.max_budget,
            "budget_duration": self.budget_duration,
            "budget_reset_at": _iso(self.budget_reset_at),
            "expires": _iso(self.expires),
            "metadata": dict(self.metadata),
            "created_at": _iso(self.created_at),
            "spend": self.spend,
        }


def _iso(when: float | None) -> str | None:
    return None if when is None else datetime.fromtimestamp(when, UTC).isoformat()


# --- reading LiteLLM's fields ---------------------------------------------------------------

_FIELDS = (
    "models", "rpm_limit", "tpm_limit", "rpm_burst", "max_parallel_requests", "max_budget",
    "budget_duration", "expires", "duration", "metadata", "key_alias",
)
# Accepted and ignored: LiteLLM's fields that mean nothing to lb (teams, users, tags...).
_IGNORED = frozenset({
    "key", "keys", "user_id", "team_id", "tags", "permissions", "aliases", "config",
    "send_invite_email", "guardrails", "blocked", "spend", "soft_budget", "key_type",
    "organization_id", "model_max_budget", "model_rpm_limit", "model_tpm_limit",
    "allowed_cache_controls", "enforced_params", "budget_id", "return_full_object",
})


def changes(body: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The KeyRecord fields an admin request sets, checked; ValueError names the bad field."""
    unknown = set(body) - set(_FIELDS) - _IGNORED
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    if "models" in body:
        models = body["models"]
        if models is None:
            models = []
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise ValueError("'models' must be a list of model ids")
        out["models"] = tuple(models)
    for name in ("rpm_limit", "tpm_limit", "rpm_burst", "max_parallel_requests"):
        if name in body:
            out[name] = _count(body[name], name)
    if "max_budget" in body:
        budget = body["max_budget"]
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int | float) or budget < 0
        ):
            raise ValueError("'max_budget' must be a number of USD >= 0, or null")
        out["max_budget"] = None if budget is None else float(budget)
    if "budget_duration" in body:
        duration = body["budget_duration"]
        if duration is None:
            out["budget_duration"] = out["budget_reset_at"] = None
        else:
            if not isinstance(duration, str):
                raise ValueError("'budget_duration' must be text such as '30d' or '1mo'")
            try:
                parsed = parse_duration(duration)
            except ValueError as exc:
                raise ValueError(f"'budget_duration': {exc}") from None
            out["budget_duration"] = duration.strip()
            out["budget_reset_at"] = add_duration(now, parsed)
    if body.get("duration") is not None:
        duration = body["duration"]
        try:
            out["expires"] = add_duration(now, parse_duration(str(duration)))
        except ValueError as exc:
            raise ValueError(f"'duration': {exc}") from None
    elif "expires" in body:
        out["expires"] = _when(body["expires"])
    if "metadata" in body:
        metadata = body["metadata"] or {}
        if not isinstance(metadata, dict):
            raise ValueError("'metadata' must be an object")
        out["metadata"] = metadata
    if "key_alias" in body:
        alias = body["key_alias"]
        if alias is not None and not isinstance(alias, str):
            raise ValueError("'key_alias' must be text")
        out["key_alias"] = alias
    return out


def _count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"'{name}' must be a whole number >= 1, or null")
    return value


def _when(value: Any) -> float | None:
    """An expiry: ISO 8601 (UTC unless it says otherwise), Unix seconds, or null."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    raise ValueError("'expires' must be an ISO 8601 time, Unix seconds, or null")


def make(body: Mapping[str, Any], key: str, now: float) -> KeyRecord:
    return KeyRecord(hash_key(key), key_name(key), created_at=now, **changes(body, now))


def update(record: KeyRecord, body: Mapping[str, Any], now: float) -> KeyRecord:
    return attrs.evolve(record, **changes(body, now))


def current_period(record: KeyRecord, now: float) -> tuple[float, bool]:
    """(the budget period's end, whether a new period began since `budget_reset_at`)."""
    if record.budget_reset_at is None or record.budget_duration is None:
        return (record.budget_reset_at or 0.0), False
    if now < record.budget_reset_at:
        return record.budget_reset_at, False
    return next_reset(record.budget_reset_at, parse_duration(record.budget_duration), now), True
