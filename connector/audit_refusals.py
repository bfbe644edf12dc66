"""A member's refusals in the audit log: a burst recorded one by one, the rest counted and
written as one aggregate entry; a member whose own faults exceed it is held back."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from connector.audit_entry import AuditEntry, bounded, now_text
from connector.config import DEFAULT_REFUSAL_BURST, DEFAULT_REFUSALS_PER_MINUTE

REFUSAL_BURST = DEFAULT_REFUSAL_BURST  # one member's refusals recorded one by one
REFUSALS_PER_SECOND = DEFAULT_REFUSALS_PER_MINUTE / 60  # ... and how fast that comes back
AGGREGATE_SECONDS = 5.0  # throttled refusals are written as one entry at most this often

# Outcomes that are always recorded one by one: something was (or may have been) answered.
ALWAYS_RECORDED = frozenset(
    {"answered", "cancelled", "stalled", "timeout", "too_large", "failed", "shutdown"}
)
# Refusals the request itself caused; a member that keeps sending them is held back
# (throttled()). Refusals the connector's state caused (busy, expired, unavailable) are
# rate-limited in the log like any refusal, but never hold the member back: a busy
# connector must not lock out the members it is too busy to serve.
FAULT_OUTCOMES = frozenset({"rejected", "denied", "unauthenticated"})


@dataclass
class _Throttled:
    """One member's refusals: the allowance left and what was counted instead of written."""

    tokens: float  # refusals that may still be written one by one
    faults: float  # refusals caused by the request that may still come before holding back
    stamp: float
    count: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    first: str = ""
    last: str = ""


class RefusalAllowance:
    """Each member's allowance of recorded refusals; not thread-safe (the log's lock guards)."""

    def __init__(self, burst: int, per_second: float) -> None:
        self._burst = burst
        self._refill = per_second
        self._throttled: dict[str, _Throttled] = {}
        self._last_aggregate = time.monotonic()

    def throttled(self, member_id: str) -> bool:
        """Whether member_id has sent more refused requests (its own faults) than allowed."""
        bucket = self._throttled.get(member_id)
        if bucket is None:
            return False
        self._refill_bucket(bucket)
        return bucket.faults < 1

    def take(self, entry: AuditEntry) -> bool:
        """Take one recorded refusal from the member's allowance; count it if none is left."""
        bucket = self._throttled.setdefault(
            entry.member_id,
            _Throttled(float(self._burst), float(self._burst), time.monotonic()),
        )
        self._refill_bucket(bucket)
        if entry.outcome in FAULT_OUTCOMES:
            bucket.faults = max(0.0, bucket.faults - 1)
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return True
        moment = now_text()
        bucket.count += 1
        bucket.outcomes[entry.outcome or "refused"] += 1
        bucket.first = bucket.first or moment
        bucket.last = moment
        return False

    def write_aggregates(
        self,
        write: Callable[[dict[str, Any]], object],
        after_write: Callable[[], None],
        *,
        force: bool,
    ) -> None:
        """Write each member's counted refusals as one entry (at most every
        AGGREGATE_SECONDS unless forced); forget members whose allowance is full again."""
        now = time.monotonic()
        if not force and now - self._last_aggregate < AGGREGATE_SECONDS:
            return
        self._last_aggregate = now
        for member, bucket in list(self._throttled.items()):
            if bucket.count:
                write(
                    {
                        "type": "refusals",
                        "member_id": bounded(member),
                        "count": bucket.count,
                        "outcomes": dict(sorted(bucket.outcomes.items())),
                        "first": bucket.first,
                        "last": bucket.last,
                    }
                )
                bucket.count, bucket.outcomes, bucket.first = 0, Counter(), ""
                after_write()
            else:
                self._refill_bucket(bucket)
                if bucket.tokens >= self._burst and bucket.faults >= self._burst:
                    del self._throttled[member]  # full allowance again: forget the member

    def _refill_bucket(self, bucket: _Throttled) -> None:
        now = time.monotonic()
        gained = (now - bucket.stamp) * self._refill
        bucket.tokens = min(self._burst, bucket.tokens + gained)
        bucket.faults = min(self._burst, bucket.faults + gained)
        bucket.stamp = now
