"""Daily quotas: durable, exact under concurrency, and saying when they reset."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import pytest

from connector.errors import ResourceExhausted
from connector.quota import PolicyQuota, QuotaLedger

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
