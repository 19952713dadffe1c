"""Keys and spend in an embedded SQLite file (one instance, no Redis).

Every call runs in a worker thread (`trio.to_thread`), one at a time through one connection,
so the event loop never waits on the disk. A version counter, bumped by every change to a key,
lets instances sharing the file (and the gate's cache) notice a revocation by polling one row.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson
import trio

from lb.policy.keys import KeyRecord, current_period

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    token TEXT PRIMARY KEY, key_name TEXT, key_alias TEXT, models TEXT, rpm_limit INTEGER,
    tpm_limit INTEGER, rpm_burst INTEGER, max_parallel_requests INTEGER, max_budget REAL,
    budget_duration TEXT, budget_reset_at REAL, expires REAL, metadata TEXT, created_at REAL,
    spend REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS spend_logs (
    request_id TEXT, token TEXT, model TEXT, node TEXT, prompt_tokens INTEGER,
    completion_tokens INTEGER, spend REAL, at REAL
);
CREATE INDEX IF NOT EXISTS spend_logs_token ON spend_logs (token, at);
CREATE TABLE IF NOT EXISTS spend_daily (
    token TEXT, model TEXT, day TEXT, spend REAL, prompt_tokens INTEGER,
    completion_tokens INTEGER, requests INTEGER, PRIMARY KEY (token, model, day)
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER);
INSERT OR IGNORE INTO meta VALUES ('version', 0);
"""
_INSERT_LOGS = "INSERT INTO spend_logs VALUES "
_LOG_ROW = "(?, ?, ?, ?, ?, ?, ?, ?)"
_LOG_COLUMNS = 8
_COLUMNS = (
    "token", "key_name", "key_alias", "models", "rpm_limit", "tpm_limit", "rpm_burst",
    "max_parallel_requests", "max_budget", "budget_duration", "budget_reset_at", "expires",
    "metadata", "created_at", "spend",
)


class SpendRecord(NamedTuple):
    """One finished request's spend. A tuple, not an attrs class: one is made per request
    and held until the flush, and a tuple of plain values is cheap to make and untracked by
    the garbage collector."""

    token: str
    request_id: str
    model: str
    node: str
    prompt_tokens: int
    completion_tokens: int
    spend: float  # USD
    at: float  # Unix seconds


def default_data_dir() -> Path:
    """The user's data directory: $XDG_DATA_HOME/lb, else ~/.local/share/lb."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lb"


def database_path(data_dir: str) -> str:
    if data_dir == ":memory:":
        return data_dir
    folder = Path(data_dir) if data_dir else default_data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / "lb.sqlite3")


class SqliteStore:
    def __init__(self, data_dir: str = "") -> None:
        self.path = database_path(data_dir)
        # One connection used by one worker thread at a time (the limiter).
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout = 5000")
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.executescript(_SCHEMA)
        self._rows_per_insert = max(
            1, self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _LOG_COLUMNS
        )
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await trio.to_thread.run_sync(
            functools.partial(fn, *args), limiter=self._limiter
        )

    def close(self) -> None:
        self._db.close()

    # --- keys ---

    async def get(self, token: str) -> KeyRecord | None:
        return await self._run(self._get, token)

    def _get(self, token: str) -> KeyRecord | None:
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM keys WHERE token = ?", (token,)
        ).fetchone()
        return None if row is None else _record(row)

    async def find_alias(self, alias: str) -> KeyRecord | None:
        return await self._run(self._find_alias, alias)

    def _find_alias(self, alias: str) -> KeyRecord | None:
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM keys WHERE key_alias = ?", (alias,)
        ).fetchone()
        return None if row is None else _record(row)

    async def list_keys(self) -> list[KeyRecord]:
        return await self._run(self._list_keys)

    def _list_keys(self) -> list[KeyRecord]:
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM keys ORDER BY created_at")
        return [_record(row) for row in rows]

    async def put(self, record: KeyRecord) -> None:
        """Insert or replace a key (its spend is the store's, not the record's)."""
        await self._run(self._put, record)

    def _put(self, record: KeyRecord) -> None:
        values = _row(record)
        with self._transaction():
            self._db.execute(
                f"INSERT INTO keys ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(values))})"
                " ON CONFLICT (token) DO UPDATE SET "
                + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:-1]),
                values,
            )
            self._bump()

    async def delete(self, tokens: Sequence[str]) -> list[str]:
        """Remove keys; returns the tokens that existed."""
        return await self._run(self._delete, tokens)

    def _delete(self, tokens: Sequence[str]) -> list[str]:
        gone = []
        with self._transaction():
            for token in tokens:
                if self._db.execute("DELETE FROM keys WHERE token = ?", (token,)).rowcount:
                    gone.append(token)
            self._bump()
        return gone

    async def version(self) -> int:
        return await self._run(self._version)

    def _version(self) -> int:
        value: int = self._db.execute("SELECT value FROM meta WHERE name = 'version'").fetchone()[0]
        return value

    def _bump(self) -> None:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'version'")

    # --- spend ---

    async def add_spend(self, records: Sequence[SpendRecord]) -> None:
        await self._run(self._add_spend, records)

    def _add_spend(self, records: Sequence[SpendRecord]) -> None:
        """One transaction per flush: every request's log row, and one update per key and per
        (key, model, day), so the cost per request is one row."""
        per_key: dict[str, tuple[float, float]] = {}  # token -> (spend, when, the latest)
        daily: dict[tuple[str, str, str], list[float]] = {}
        days: dict[int, str] = {}
        for rec in records:
            spent, _ = per_key.get(rec.token, (0.0, 0.0))
            per_key[rec.token] = (spent + rec.spend, rec.at)
            number = int(rec.at // 86400)
            day = days.get(number) or days.setdefault(number, _day(rec.at))
            sums = daily.setdefault((rec.token, rec.model, day), [0.0, 0, 0, 0])
            sums[0] += rec.spend
            sums[1] += rec.prompt_tokens
            sums[2] += rec.completion_tokens
            sums[3] += 1
        with self._transaction():
            # Rows in as few statements as SQLite's limit on parameters allows: each statement
            # steps once (executemany steps per row, dropping and retaking the GIL each time,
            # which the event loop pays for), and nothing is parsed on the way (a JSON array
            # through json_each cost twice as many instructions a row).
            for start in range(0, len(records), self._rows_per_insert):
                part = records[start:start + self._rows_per_insert]
                self._db.execute(
                    _INSERT_LOGS + ", ".join([_LOG_ROW] * len(part)),
                    [value for rec in part for value in (
                        rec.request_id, rec.token, rec.model, rec.node, rec.prompt_tokens,
                        rec.completion_tokens, rec.spend, rec.at)],
                )
            for token, (spent, at) in per_key.items():
                row = self._get(token)
                if row is None:
                    continue  # deleted meanwhile: its logs stay
                end, new_period = current_period(row, at)
                self._db.execute(
                    "UPDATE keys SET spend = ?, budget_reset_at = ? WHERE token = ?",
                    (spent if new_period else row.spend + spent,
                     end if row.budget_reset_at is not None else None, token),
                )
            self._db.executemany(
                "INSERT INTO spend_daily VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (token, model, day) DO UPDATE SET spend = spend + excluded.spend,"
                " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
                " completion_tokens = completion_tokens + excluded.completion_tokens,"
                " requests = requests + excluded.requests",
                [(*key, *sums) for key, sums in daily.items()],
            )

    async def spend_logs(self, token: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        return await self._run(self._spend_logs, token, limit)

    def _spend_logs(self, token: str | None, limit: int) -> list[dict[str, Any]]:
        query = "SELECT request_id, token, model, node, prompt_tokens, completion_tokens, spend, at"
        query += " FROM spend_logs"
        args: tuple[Any, ...] = ()
        if token is not None:
            query += " WHERE token = ?"
            args = (token,)
        rows = self._db.execute(query + " ORDER BY at DESC LIMIT ?", (*args, limit))
        names = ("request_id", "api_key", "model", "node", "prompt_tokens",
                 "completion_tokens", "spend", "at")
        return [dict(zip(names, row, strict=True)) for row in rows]

    async def spend_daily(self, token: str | None = None) -> list[dict[str, Any]]:
        return await self._run(self._spend_daily, token)

    def _spend_daily(self, token: str | None) -> list[dict[str, Any]]:
        query = "SELECT token, model, day, spend, prompt_tokens, completion_tokens, requests"
        query += " FROM spend_daily"
        args: tuple[Any, ...] = ()
        if token is not None:
            query += " WHERE token = ?"
            args = (token,)
        names = ("api_key", "model", "day", "spend", "prompt_tokens", "completion_tokens",
                 "requests")
        rows = self._db.execute(query + " ORDER BY day, model", args)
        return [dict(zip(names, row, strict=True)) for row in rows]

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, *rest: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")


def _day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


def _row(record: KeyRecord) -> tuple[Any, ...]:
    return (
        record.token, record.key_name, record.key_alias, orjson.dumps(record.models).decode(),
        record.rpm_limit, record.tpm_limit, record.rpm_burst, record.max_parallel_requests,
        record.max_budget, record.budget_duration, record.budget_reset_at, record.expires,
        orjson.dumps(dict(record.metadata)).decode(), record.created_at, record.spend,
    )


def _record(row: Iterable[Any]) -> KeyRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["models"] = tuple(orjson.loads(values["models"] or "[]"))
    values["metadata"] = orjson.loads(values["metadata"] or "{}")
    values["key_name"] = values["key_name"] or ""
    return KeyRecord(**values)
