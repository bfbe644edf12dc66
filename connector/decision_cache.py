"""Decisions kept for identical requests under the same policies, revocations and dates.

A decision is a function of the request (member, purpose, datasets, columns, whole rows),
the policies in force and where the request's time falls among the policies' start and
expiry moments (the Rego library compares the time with nothing else). So a decision is
reused only while all of these are the same object or the same value: a policy reload makes
a new snapshot and a revocation change a new Revocations, either of which empties the cache
before it is read, and a request whose time crossed a policy's start or expiry falls in
another time slot, so it is decided again. A stale grant would be a security bug: nothing
here outlives the snapshot it was decided under.
"""

from __future__ import annotations

import bisect
import datetime as dt
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping

from connector.canonical import json_copy
from connector.policy.engine import Decision, DecisionRequest
from connector.policy.model import ns
from connector.policy.registry import PolicySnapshot

MAX_DECISIONS = 4096
_NEVER_BEFORE, _NEVER_AFTER = -(2**63), 2**63

_Key = tuple[str, str, tuple[str, ...], tuple[tuple[str, frozenset[str]], ...], bool, int]


def date_boundaries(snapshot: PolicySnapshot) -> tuple[int, ...]:
    """Every moment (ns) at which a policy known to snapshot starts or stops being valid."""
    policies = list(snapshot.policies) + [v.policy for v in snapshot.verdicts if v.policy]
    moments = {ns(p.valid_from) for p in policies} | {ns(p.valid_until) for p in policies}
    return tuple(sorted(moments))


def _time_slot(boundaries: tuple[int, ...], time: dt.datetime) -> int:
    """Which interval between boundaries time falls in (a boundary starts its interval, as
    valid_from <= t < valid_until in the Rego library)."""
    return bisect.bisect_right(boundaries, ns(time))


class DecisionCache:
    """A bounded LRU of decisions for one generation of (policy snapshot, revocations).

    max_entries 0 keeps nothing (every decision is taken by the engine)."""

    def __init__(self, max_entries: int = MAX_DECISIONS) -> None:
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._entries: OrderedDict[_Key, Decision] = OrderedDict()
        self._snapshot: PolicySnapshot | None = None
        self._revoked: Hashable = None
        self._boundaries: tuple[int, ...] = ()
        self.hits = 0
        self.misses = 0

    def decide(
        self,
        snapshot: PolicySnapshot,
        revoked: Hashable,
        request: DecisionRequest,
        decide: Callable[[DecisionRequest], Decision] | None = None,
    ) -> Decision:
        """The decision for request under snapshot (taken by decide, default the snapshot's
        engine, unless the same request was decided under the same generation and slot)."""
        with self._lock:
            # Following the generation and looking up in one turn of the lock: between the
            # two, a request of the previous snapshot could bring back its own entries.
            key = self._key(snapshot, revoked, request)
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if found is not None:
            return _private(found)
        decision = (decide or snapshot.engine.decide)(request)
        with self._lock:
            self.misses += 1
            # Kept only if the generation did not change while the engine decided.
            same = self._snapshot is snapshot and self._revoked is revoked
            if self.max_entries > 0 and same:
                self._entries[key] = _private(decision)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return decision

    def time_span(self, snapshot: PolicySnapshot, time: dt.datetime) -> tuple[int, int]:
        """The span [from, until) of times (ns) around time in which no policy of snapshot
        starts or stops being valid: a decision taken at time holds through it."""
        with self._lock:
            kept = self._boundaries if self._snapshot is snapshot else None
        boundaries = kept if kept is not None else date_boundaries(snapshot)
        slot = _time_slot(boundaries, time)
        low = boundaries[slot - 1] if slot > 0 else _NEVER_BEFORE
        high = boundaries[slot] if slot < len(boundaries) else _NEVER_AFTER
        return low, high

    def clear(self) -> None:
        """Forget every decision."""
        with self._lock:
            self._entries.clear()
            self._snapshot = None

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _key(self, snapshot: PolicySnapshot, revoked: Hashable, request: DecisionRequest) -> _Key:
        """The request's key, the cache following snapshot and revoked (hold the lock)."""
        if self._snapshot is not snapshot or self._revoked is not revoked:
            # Identity, not equality: each reload makes a new object, and the cache holds
            # the one it follows, so its id cannot be reused by another.
            self._entries.clear()
            self._snapshot, self._revoked = snapshot, revoked
            self._boundaries = date_boundaries(snapshot)
        boundaries = self._boundaries
        # Column names come from the store's metadata (the guard's names only select them),
        # and datasets are in the guard's sorted order: the key needs no further sorting.
        columns = tuple((d, frozenset(c)) for d, c in request.columns.items())
        slot = _time_slot(boundaries, request.time)
        return (
            request.member,
            request.purpose,
            tuple(request.datasets),
            columns,
            bool(request.uses_star),
            slot,
        )


def _private(decision: Decision) -> Decision:
    """A copy no caller can change the cached one through (obligations are a dict)."""
    if not decision.obligations:
        return decision
    obligations: Mapping[str, object] = json_copy(dict(decision.obligations))
    # The constructor, not dataclasses.replace: this runs on every cache hit (8 us less).
    return Decision(decision.allow, decision.reasons, decision.grants, obligations)
