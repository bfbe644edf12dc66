"""A query's decision kept with everything it was decided on, to be used again unchanged,
and the audit entry's fields a decision fills in.

The Flight SQL wire decides when it issues a ticket (GetFlightInfo) and answers later
(DoGet). The answer reuses that decision only while deciding again would give the same one:
the same member and request, the same policy snapshot (a reload or a directory change makes
a new one), the same revocations, the clock in the same span between the policies' validity
moments (the decision library reads nothing else of the time) and the same data generation
(compared by Provider.query under its commit gate).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from connector.audit_entry import AuditEntry
from connector.canonical import json_copy
from connector.config import Revocations
from connector.enforce import Relation
from connector.policy.engine import Decision
from connector.policy.model import ns
from connector.policy.registry import PolicySnapshot
from connector.request import Explanation, PeerRequest
from connector.sqlguard import QueryShape

# The audit entry's fields a decision fills in (Provider._explain): copied to the entry of a
# request that reuses the decision, so both wires record the same thing.
_DECIDED_FIELDS = ("datasets", "decision", "reasons", "policies", "versions", "obligations",
                   "columns")  # fmt: skip


def record_decision(
    entry: AuditEntry, decision: Decision, relations: Sequence[Relation], shape: QueryShape
) -> None:
    """Write what a decision decided onto the request's audit entry (datasets and policies
    are written as the decision is taken)."""
    entry.decision = "allow" if decision.allow else "deny"
    entry.reasons = decision.reasons
    entry.versions = {r.dataset: [r.since, r.version] for r in relations}
    entry.obligations = dict(decision.obligations)
    entry.columns = {
        r.dataset: [c for c in r.column_names if shape.uses_star or c in shape.column_refs]
        for r in relations
    }


def request_key(request: PeerRequest) -> tuple[str, str, int]:
    """What of a request its decision depends on."""
    return request.sql, request.purpose, request.since_version


@dataclass(frozen=True)
class Decided:
    """A query's Explanation with everything it was decided on."""

    member_id: str
    request: tuple[str, str, int]  # request_key
    explanation: Explanation
    snapshot: PolicySnapshot
    revoked: Revocations
    # The decision holds for clock times in [holds_from, holds_until) (ns).
    holds_from: int
    holds_until: int
    recorded: tuple[tuple[str, Any], ...]  # the audit entry's _DECIDED_FIELDS

    def holds(
        self,
        member_id: str,
        request: PeerRequest,
        snapshot: PolicySnapshot,
        revoked: Revocations,
        now: dt.datetime,
    ) -> bool:
        """Whether this is still the decision for member_id's request now."""
        return (
            self.member_id == member_id
            and self.request == request_key(request)
            and self.snapshot is snapshot
            and self.revoked is revoked
            and self.holds_from <= ns(now) < self.holds_until
        )

    def restore(self, entry: AuditEntry) -> Explanation:
        """The Explanation, with the audit fields it filled in copied onto entry."""
        for name, value in self.recorded:
            setattr(entry, name, json_copy(value))
        return self.explanation


def decided(
    member_id: str,
    request: PeerRequest,
    explanation: Explanation,
    entry: AuditEntry,
    *,
    snapshot: PolicySnapshot,
    revoked: Revocations,
    slot: tuple[int, int],
) -> Decided:
    """The Decided for an allowed explanation taken at a time within slot."""
    recorded = tuple((name, json_copy(getattr(entry, name))) for name in _DECIDED_FIELDS)
    return Decided(member_id, request_key(request), explanation, snapshot, revoked, *slot, recorded)
