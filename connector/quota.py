"""Daily quotas per member and policy, counted durably in SQLite (the DuckDB file is read-only).

Queries are claimed when a query starts, and rows and Arrow IPC bytes batch by batch before
they are sent, each in its own transaction, so concurrent queries together never pass a limit
and the counts survive restarts and crashes (a crash can only over-count what was sent).

A claim is committed at once (a process crash keeps it) and made durable against a power
loss by sync() before any byte it allows leaves: one fsync of the write-ahead log covers
every claim committed before it (of one query, and of queries running beside it), instead
of one fsync per claim.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from connector.errors import ResourceExhausted, StateUnavailable
from connector.noise import MICRO, BudgetStatus, PrivacyCharge, charges
from connector.shaping import Noise

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, member TEXT NOT NULL, policy TEXT NOT NULL,
    queries INTEGER NOT NULL DEFAULT 0, rows INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
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
# Ledgers written before byte quotas existed lack the bytes column.
_ADD_BYTES = "ALTER TABLE usage ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0"


@dataclass(frozen=True)
class PolicyQuota:
    """The daily limits of one policy (0: no limit)."""

    policy_id: str
    queries_per_day: int = 0
    rows_per_day: int = 0
    bytes_per_day: int = 0

    @property
    def counts_sent(self) -> bool:
        """True when rows or bytes sent must be claimed."""
        return bool(self.rows_per_day or self.bytes_per_day)


@dataclass(frozen=True)
class Usage:
    """What one member used today under one policy."""

    queries: int = 0
    rows: int = 0
    bytes: int = 0


def _today(now: dt.datetime) -> tuple[str, dt.datetime]:
    day = now.astimezone(dt.UTC).date()
    reset = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    return day.isoformat(), reset


def _used_up(quota: PolicyQuota, used: Usage) -> str:
    """Which limit is reached ('' when none)."""
    if quota.queries_per_day and used.queries >= quota.queries_per_day:
        return f"{quota.queries_per_day} queries a day"
    if quota.rows_per_day and used.rows >= quota.rows_per_day:
        return f"{quota.rows_per_day} rows a day"
    if quota.bytes_per_day and used.bytes >= quota.bytes_per_day:
        return f"{quota.bytes_per_day} bytes a day"
    return ""


def _exhausted(quota: PolicyQuota, what: str, reset: dt.datetime) -> ResourceExhausted:
    return ResourceExhausted(
        f"the daily quota of policy {quota.policy_id} ({what}) is used up; it resets at "
        f"{reset.isoformat()}"
    )


class QuotaLedger:
    """Durable daily counts; thread-safe (one connection, one lock, one transaction a claim)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # Commits are written to the log at once, fsync'd by sync() (a checkpoint syncs the
        # log before it copies it into the file, and the file after).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._wal = Path(f"{path}-wal")
        self._commits = 0  # claims committed so far
        self._synced = 0  # of which the last finished sync() covered these
        self._sync_lock = threading.Lock()
        self._db.execute(_SCHEMA)
        self._db.execute(_PRIVACY_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(usage)")}
        if "bytes" not in columns:
            self._db.execute(_ADD_BYTES)
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the ledger."""
        with self._lock:
            self._db.close()

    @property
    def unsynced(self) -> int:
        """Claims committed but not yet made durable by sync()."""
        with self._lock:
            return self._commits - self._synced

    def sync(self) -> None:
        """Return once every claim committed so far is on disk (before what it allows is
        sent); StateUnavailable if the log cannot be synced."""
        with self._lock:
            wanted = self._commits
        with self._sync_lock:
            if self._synced >= wanted:
                return  # a sync that started after those commits covered them
            with self._lock:
                covered = self._commits
            try:
                fd = os.open(self._wal, os.O_RDONLY)
            except FileNotFoundError:
                return  # no log: everything was checkpointed into the file (and synced)
            try:
                os.fsync(fd)
            except OSError as error:
                log.error("the quota ledger's log could not be synced: %s", error)
                raise StateUnavailable(
                    "the provider's connector cannot put its quota counts on disk right now, "
                    "so it sends nothing; retry later"
                ) from error
            finally:
                os.close(fd)
            self._synced = covered

    def _commit(self) -> None:
        self._db.execute("COMMIT")
        self._commits += 1

    def _counts(self, day: str, member: str, policy: str) -> Usage:
        row = self._db.execute(
            "SELECT queries, rows, bytes FROM usage WHERE day = ? AND member = ? AND policy = ?",
            (day, member, policy),
        ).fetchone()
        return Usage(int(row[0]), int(row[1]), int(row[2])) if row else Usage()

    def _add(self, day: str, member: str, policy: str, added: Usage) -> None:
        self._db.execute(
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (day, member, policy) "
            "DO UPDATE SET queries = queries + excluded.queries, rows = rows + excluded.rows, "
            "bytes = bytes + excluded.bytes",
            (day, member, policy, added.queries, added.rows, added.bytes),
        )

    def claim_query(self, member: str, quotas: Sequence[PolicyQuota], now: dt.datetime) -> None:
        """Count one query against every policy; ResourceExhausted says when a quota resets."""
        if not quotas:
            return  # nothing to count: no transaction (most queries of most grants)
        day, reset = _today(now)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for quota in quotas:
                    used_up = _used_up(quota, self._counts(day, member, quota.policy_id))
                    if used_up:
                        raise _exhausted(quota, used_up, reset)
                for quota in quotas:
                    self._add(day, member, quota.policy_id, Usage(queries=1))
                self._commit()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def claim_rows(
        self, member: str, quotas: Sequence[PolicyQuota], wanted: int, now: dt.datetime
    ) -> int:
        """Claim up to `wanted` rows against every policy; returns how many may be sent."""
        return self.claim_sent(member, quotas, wanted, lambda _: 0, now=now)[0]

    def claim_bytes(
        self, member: str, quotas: Sequence[PolicyQuota], size: int, now: dt.datetime
    ) -> None:
        """Claim exactly `size` bytes (all or nothing); ResourceExhausted when they do not fit."""
        day, reset = _today(now)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for quota in quotas:
                    used = self._counts(day, member, quota.policy_id).bytes
                    if quota.bytes_per_day and used + size > quota.bytes_per_day:
                        raise _exhausted(quota, f"{quota.bytes_per_day} bytes a day", reset)
                for quota in quotas:
                    self._add(day, member, quota.policy_id, Usage(bytes=size))
                self._commit()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def claim_sent(
        self,
        member: str,
        quotas: Sequence[PolicyQuota],
        wanted: int,
        size_of: Callable[[int], int],
        *,
        now: dt.datetime,
        max_bytes: int | None = None,
    ) -> tuple[int, int, str]:
        """Claim the most of `wanted` rows whose bytes (`size_of(rows)`, growing with rows)
        fit every policy's daily rows and bytes and `max_bytes` (None: no cap). Returns the
        rows and bytes claimed, which may then be sent, and the limit that cut them ('')."""
        day, _ = _today(now)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows_left, bytes_left = wanted, -1 if max_bytes is None else max_bytes
                bytes_limit = "max_bytes_per_query"
                for quota in quotas:
                    used = self._counts(day, member, quota.policy_id)
                    if quota.rows_per_day:
                        rows_left = min(rows_left, max(0, quota.rows_per_day - used.rows))
                    left = max(0, quota.bytes_per_day - used.bytes)
                    if quota.bytes_per_day and (bytes_left < 0 or left < bytes_left):
                        bytes_left, bytes_limit = left, "bytes_per_day"
                rows = most_rows(rows_left, size_of, bytes_left)
                size = size_of(rows) if rows else 0
                for quota in quotas:
                    self._add(day, member, quota.policy_id, Usage(rows=rows, bytes=size))
                self._commit()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        limit = "" if rows == wanted else "rows_per_day" if rows == rows_left else bytes_limit
        return rows, size, limit

    def usage_today(self, now: dt.datetime) -> list[tuple[str, str, Usage]]:
        """Every (member, policy, usage) counted today (UTC), for monitoring."""
        day, _ = _today(now)
        with self._lock:
            rows = self._db.execute(
                "SELECT member, policy, queries, rows, bytes FROM usage WHERE day = ? "
                "ORDER BY member, policy",
                (day,),
            ).fetchall()
        return [(str(m), str(p), Usage(int(q), int(r), int(b))) for m, p, q, r, b in rows]

    def usage(self, member: str, policy_id: str, now: dt.datetime) -> tuple[int, int]:
        """Queries and rows counted today for member under policy."""
        used = self.used(member, policy_id, now)
        return used.queries, used.rows

    def used(self, member: str, policy_id: str, now: dt.datetime) -> Usage:
        """Queries, rows and bytes counted today for member under policy."""
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
                self._commit()
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

    def privacy_budget(
        self, member: str, noised: Sequence[tuple[str, Noise]], now: dt.datetime
    ) -> BudgetStatus | None:
        """The privacy budget member has left today under the noising policies given (the
        tightest one's); None when none is given."""
        left: list[tuple[int, int]] = []
        resets = now
        for policy_id, noise in noised:
            spent, resets = self.privacy_spent(member, policy_id, now)
            daily = charges(noise, [policy_id])[0].per_day
            left.append((max(0, daily - spent), daily))
        if not left:
            return None
        remaining, daily = min(left)
        return BudgetStatus(daily / MICRO, remaining / MICRO, resets)


def most_rows(rows: int, size_of: Callable[[int], int], budget: int) -> int:
    """The largest n <= rows with size_of(n) <= budget (budget < 0: no limit)."""
    if budget < 0 or rows == 0 or size_of(rows) <= budget:
        return rows
    low, high = 0, rows  # size_of(low) fits (0 rows are never sent), size_of(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        if size_of(middle) <= budget:
            low = middle
        else:
            high = middle
    return low
