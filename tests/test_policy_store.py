"""The SQLite store's spend: a flush larger than one statement's rows loses and doubles nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from lb.policy import keys
from lb.policy.store import SpendRecord, SqliteStore

AT = 1_790_000_000.0


@pytest.mark.parametrize("count", [1, 4_095, 10_001])
async def test_a_flush_of_any_size_writes_every_row_once(tmp_path: Path, count: int) -> None:
    store = SqliteStore(str(tmp_path))
    record = keys.make({}, "sk-test-key-000", AT)
    await store.put(record)
    per_statement = store._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // 8
    records = [
        SpendRecord(record.token, f"req-{i}", "m" if i % 3 else "n", "node:1", 10, i % 7,
                    0.25, AT + i % 100)
        for i in range(count)
    ]
    await store.add_spend(records)
    logs = await store.spend_logs(record.token, limit=count + 10)
    assert sorted(row["request_id"] for row in logs) == sorted(r.request_id for r in records)
    assert logs[0] == {
        "request_id": logs[0]["request_id"], "api_key": record.token,
        "model": logs[0]["model"], "node": "node:1", "prompt_tokens": 10,
        "completion_tokens": logs[0]["completion_tokens"], "spend": 0.25,
        "at": logs[0]["at"],
    }
    daily = await store.spend_daily(record.token)
    assert sum(row["requests"] for row in daily) == count
    assert sum(row["completion_tokens"] for row in daily) == sum(i % 7 for i in range(count))
    stored = await store.get(record.token)
    assert stored is not None and stored.spend == pytest.approx(0.25 * count)
    assert count <= per_statement or count > 2 * per_statement  # one statement, or several
    store.close()
