"""Daily quotas: durable, exact under concurrency, and saying when they reset."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from pathlib import Path

import pytest

from connector.errors import ResourceExhausted
from connector.quota import PolicyQuota, QuotaLedger, Usage

NOW = dt.datetime(2026, 11, 25, 15, 30, tzinfo=dt.UTC)


def test_queries_per_day_counts_and_says_when_it_resets(tmp_path: Path) -> None:
    ledger = QuotaLedger(tmp_path / "q.sqlite")
    quotas = [PolicyQuota("p", queries_per_day=2)]
    ledger.claim_query("acme", quotas, NOW)
    ledger.claim_query("acme", quotas, NOW)
    with pytest.raises(ResourceExhausted, match=r"2 queries a day.*resets at 2026-11-26T00:00"):
        ledger.claim_query("acme", quotas, NOW)
    ledger.claim_query("other-member", quotas, NOW)
    ledger.claim_query("acme", quotas, NOW + dt.timedelta(days=1))
    ledger.close()


def test_counts_survive_a_restart(tmp_path: Path) -> None:
    ledger = QuotaLedger(tmp_path / "q.sqlite")
    ledger.claim_query("acme", [PolicyQuota("p", queries_per_day=1)], NOW)
    assert ledger.claim_rows("acme", [PolicyQuota("p", rows_per_day=10)], 7, NOW) == 7
    ledger.close()
    reopened = QuotaLedger(tmp_path / "q.sqlite")
    assert reopened.usage("acme", "p", NOW) == (1, 7)
    assert reopened.claim_rows("acme", [PolicyQuota("p", rows_per_day=10)], 7, NOW) == 3
    with pytest.raises(ResourceExhausted, match="10 rows a day"):
        reopened.claim_query("acme", [PolicyQuota("p", rows_per_day=10)], NOW)
    reopened.close()


def test_concurrent_claims_never_pass_the_limit(tmp_path: Path) -> None:
    ledger = QuotaLedger(tmp_path / "q.sqlite")
    quotas = [PolicyQuota("p", queries_per_day=50, rows_per_day=1000)]
    granted: list[int] = []
    refused: list[str] = []

    def worker() -> None:
        for _ in range(20):
            try:
                ledger.claim_query("acme", quotas, NOW)
            except ResourceExhausted as exc:
                refused.append(str(exc))
                continue
            granted.append(ledger.claim_rows("acme", quotas, 30, NOW))

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queries, rows = ledger.usage("acme", "p", NOW)
    assert sum(granted) == rows == 1000
    assert queries <= 50 and len(granted) + len(refused) == 100
    ledger.close()


def test_the_tightest_policy_limits_a_query_under_several(tmp_path: Path) -> None:
    ledger = QuotaLedger(tmp_path / "q.sqlite")
    quotas = [PolicyQuota("a", rows_per_day=100), PolicyQuota("b", rows_per_day=40)]
    assert ledger.claim_rows("acme", quotas, 70, NOW) == 40
    assert ledger.usage("acme", "a", NOW) == (0, 40)
    ledger.close()


def test_bytes_per_day_cuts_at_a_row_whose_bytes_fit_and_names_the_limit(tmp_path: Path) -> None:
    ledger = QuotaLedger(tmp_path / "q.sqlite")
    quotas = [PolicyQuota("p", bytes_per_day=1000)]
    ledger.claim_bytes("acme", quotas, 200, NOW)
    rows, size, limit = ledger.claim_sent("acme", quotas, 50, lambda n: 100 + 30 * n, now=NOW)
    assert (rows, size, limit) == (23, 790, "bytes_per_day")  # 100 + 30 * 23 <= 800
    assert ledger.used("acme", "p", NOW).bytes == 990
    assert ledger.claim_sent("acme", quotas, 5, lambda n: 100 + 30 * n, now=NOW)[0] == 0
    with pytest.raises(ResourceExhausted, match=r"1000 bytes a day.*resets at"):
        ledger.claim_bytes("acme", quotas, 11, NOW)
    ledger.claim_bytes("acme", quotas, 10, NOW)
    with pytest.raises(ResourceExhausted, match="1000 bytes a day"):
        ledger.claim_query("acme", quotas, NOW)
    ledger.close()


def test_the_tighter_of_a_query_cap_and_the_daily_bytes_names_the_cut(tmp_path: Path) -> None:
    ledger = QuotaLedger(tmp_path / "q.sqlite")
    quotas = [PolicyQuota("p", rows_per_day=100, bytes_per_day=10_000)]
    size = lambda n: 10 * n  # noqa: E731
    assert ledger.claim_sent("acme", quotas, 50, size, now=NOW, max_bytes=205) == (
        20,
        200,
        "max_bytes_per_query",
    )
    assert ledger.claim_sent("acme", quotas, 90, size, now=NOW) == (80, 800, "rows_per_day")
    assert ledger.used("acme", "p", NOW) == Usage(0, 100, 1000)
    ledger.close()


def test_concurrent_byte_claims_never_pass_the_limit(tmp_path: Path) -> None:
    ledger = QuotaLedger(tmp_path / "q.sqlite")
    quotas = [PolicyQuota("p", bytes_per_day=50_000)]
    sent: list[int] = []

    def worker() -> None:
        for _ in range(40):
            sent.append(ledger.claim_sent("acme", quotas, 100, lambda n: 7 * n + 3, now=NOW)[1])

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(sent) == ledger.used("acme", "p", NOW).bytes <= 50_000
    assert sum(sent) > 50_000 - 703  # the last claims fill what is left
    ledger.close()


def test_a_ledger_from_before_byte_quotas_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE usage (day TEXT NOT NULL, member TEXT NOT NULL, policy TEXT NOT NULL, "
        "queries INTEGER NOT NULL DEFAULT 0, rows INTEGER NOT NULL DEFAULT 0, "
        "PRIMARY KEY (day, member, policy))"
    )
    old.execute("INSERT INTO usage VALUES ('2026-11-25', 'acme', 'p', 3, 40)")
    old.commit()
    old.close()
    ledger = QuotaLedger(path)
    assert ledger.used("acme", "p", NOW) == Usage(3, 40, 0)
    ledger.claim_bytes("acme", [PolicyQuota("p", bytes_per_day=100)], 60, NOW)
    assert ledger.used("acme", "p", NOW) == Usage(3, 40, 60)
    ledger.close()


def _synced_files(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files fsync'd from now on, in order."""
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return synced


def test_one_sync_makes_every_claim_before_it_durable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = QuotaLedger(tmp_path / "q.sqlite")
    quotas = [PolicyQuota("p", queries_per_day=10, rows_per_day=100, bytes_per_day=10_000)]
    synced = _synced_files(monkeypatch)
    ledger.sync()
    assert synced == []  # nothing claimed yet
    ledger.claim_query("acme", quotas, NOW)
    ledger.claim_bytes("acme", quotas, 100, NOW)
    ledger.claim_sent("acme", quotas, 5, lambda rows: rows * 10, now=NOW)
    ledger.sync()
    assert synced == [f"{tmp_path / 'q.sqlite'}-wal"]
    ledger.sync()  # nothing new: no second fsync
    ledger.claim_rows("acme", quotas, 1, NOW)
    ledger.sync()
    assert len(synced) == 2
    ledger.close()
    assert QuotaLedger(tmp_path / "q.sqlite").used("acme", "p", NOW) == Usage(1, 6, 150)
