"""Daily quotas per member and policy, counted durably in SQLite (the DuckDB file is read-only).

Queries are claimed when a query starts and rows batch by batch before they are sent, each
in its own transaction, so concurrent queries together never pass a limit and the counts
survive restarts and crashes (a crash can only over-count rows that were claimed).
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from connector.errors import ResourceExhausted
from connector.noise import MICRO, PrivacyCharge

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, member TEXT NOT NULL, policy TEXT NOT NULL,
    queries INTEGER NOT NULL DEFAULT 0, rows INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, member, policy)
)
"""
# The privacy budget a member spent under a noising policy, in whole micro-epsilons.
_PRIVACY_SCHEMA = """
CREATE TABLE IF NOT EXISTS privacy (
    day TEXT NOT NULL, member TEXT NOT NULL, policy TEXT NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, member, policy)
)
"""


@dataclass(frozen=True)
class PolicyQuota:
    """The daily limits of one policy (0: no limit)."""

    policy_id: str
    queries_per_day: int = 0
    rows_per_day: int = 0


def _today(now: dt.datetime) -> tuple[str, dt.datetime]:
    day = now.astimezone(dt.UTC).date()
    reset = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    return day.isoformat(), reset


def _used_up(quota: PolicyQuota, queries: int, rows: int) -> str:
    """Which limit is reached ('' when none)."""
    if quota.queries_per_day and queries >= quota.queries_per_day:
        return f"{quota.queries_per_day} queries a day"
    if quota.rows_per_day and rows >= quota.rows_per_day:
        return f"{quota.rows_per_day} rows a day"
    return ""


class QuotaLedger:
    """Durable daily counts; thread-safe (one connection, one lock, one transaction a claim)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)
        self._db.execute(_PRIVACY_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the ledger."""
        with self._lock:
            self._db.close()

    def _counts(self, day: str, member: str, policy: str) -> tuple[int, int]:
        row = self._db.execute(
            "SELECT queries, rows FROM usage WHERE day = ? AND member = ? AND policy = ?",
            (day, member, policy),
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def _add(self, day: str, member: str, policy: str, queries: int, rows: int) -> None:
        self._db.execute(
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?) ON CONFLICT (day, member, policy) "
            "DO UPDATE SET queries = queries + excluded.queries, rows = rows + excluded.rows",
            (day, member, policy, queries, rows),
        )

    def claim_query(self, member: str, quotas: Sequence[PolicyQuota], now: dt.datetime) -> None:
        """Count one query against every policy; ResourceExhausted says when a quota resets."""
        day, reset = _today(now)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for quota in quotas:
                    used_up = _used_up(quota, *self._counts(day, member, quota.policy_id))
                    if used_up:
                        raise ResourceExhausted(
                            f"the daily quota of policy {quota.policy_id} ({used_up}) is used "
                            f"up; it resets at {reset.isoformat()}"
                        )
                for quota in quotas:
                    self._add(day, member, quota.policy_id, 1, 0)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def claim_rows(
        self, member: str, quotas: Sequence[PolicyQuota], wanted: int, now: dt.datetime
    ) -> int:
        """Claim up to `wanted` rows against every policy; returns how many may be sent."""
        day, _ = _today(now)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                granted = wanted
                for quota in quotas:
                    if quota.rows_per_day:
                        _, rows = self._counts(day, member, quota.policy_id)
                        granted = min(granted, max(0, quota.rows_per_day - rows))
                for quota in quotas:
                    self._add(day, member, quota.policy_id, 0, granted)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return granted

    def usage(self, member: str, policy_id: str, now: dt.datetime) -> tuple[int, int]:
        """Queries and rows counted today for member under policy."""
        with self._lock:
            return self._counts(_today(now)[0], member, policy_id)

    def _spent(self, day: str, member: str, policy: str) -> int:
        row = self._db.execute(
            "SELECT spent FROM privacy WHERE day = ? AND member = ? AND policy = ?",
            (day, member, policy),
        ).fetchone()
        return int(row[0]) if row else 0

    def claim_privacy(
        self, member: str, charges: Sequence[PrivacyCharge], now: dt.datetime
    ) -> None:
        """Spend one query's epsilon under every policy, or none; ResourceExhausted says when
        the daily privacy budget resets."""
        day, reset = _today(now)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for charge in charges:
                    spent = self._spent(day, member, charge.policy_id)
                    if spent + charge.cost > charge.per_day:
                        raise ResourceExhausted(
                            f"the daily privacy budget of policy {charge.policy_id} "
                            f"(epsilon {charge.per_day / MICRO:g}) is spent: "
                            f"{max(0, charge.per_day - spent) / MICRO:g} is left and a query "
                            f"costs {charge.cost / MICRO:g}; it resets at {reset.isoformat()}"
                        )
                for charge in charges:
                    self._db.execute(
                        "INSERT INTO privacy VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (day, member, policy) DO UPDATE SET spent = spent + "
                        "excluded.spent",
                        (day, member, charge.policy_id, charge.cost),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def privacy_spent(
        self, member: str, policy_id: str, now: dt.datetime
    ) -> tuple[int, dt.datetime]:
        """Micro-epsilons member spent today under policy, and when that count resets."""
        day, reset = _today(now)
        with self._lock:
            return self._spent(day, member, policy_id), reset
