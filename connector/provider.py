"""The answering side, free of any transport: who asks, what policy says, what is sent back.

`Provider` wires identity -> guard -> policy -> enforce -> store -> receipt. The gRPC
servicer only converts messages and maps the exceptions raised here to status codes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from connector.aggregates import aggregate_form
from connector.audit import AuditEntry, AuditLog
from connector.config import Revocations
from connector.enforce import Relation, relations_for, visible_columns
from connector.errors import (
    AnswerTooLarge,
    ConnectorError,
    NotAuthenticated,
    PermissionDenied,
    QueryCancelled,
    QueryRejected,
    QueryTimeout,
    RequestAbandoned,
    RequestExpired,
    ResourceExhausted,
    Unavailable,
)
from connector.identity import MemberIdentity, member_identity
from connector.policy.engine import CatalogGrant, Decision, DecisionRequest, PolicyEngine
from connector.policy.model import Limits
from connector.policy.registry import PolicyRegistry
from connector.query_run import QueryRun
from connector.quota import PolicyQuota, QuotaLedger
from connector.receipt import ReceiptSigner, policy_uses
from connector.request import Explanation, PeerRequest
from connector.sandbox import SandboxDatabase
from connector.shaping import Shaping, strictest
from connector.sqlguard import QueryShape, inspect_query
from connector.store import ColumnInfo, DatasetInfo

log = logging.getLogger(__name__)

OUTCOMES: tuple[tuple[type[ConnectorError], str], ...] = (
    (NotAuthenticated, "unauthenticated"),
    (PermissionDenied, "denied"),
    (QueryRejected, "rejected"),
    (AnswerTooLarge, "too_large"),
    (ResourceExhausted, "exhausted"),
    (RequestExpired, "expired"),
    (RequestAbandoned, "abandoned"),
    (QueryTimeout, "timeout"),
    (QueryCancelled, "cancelled"),
    (Unavailable, "unavailable"),
)


@dataclass(frozen=True)
class CatalogDataset:
    """One dataset as a peer sees it: only the columns and terms granted to that peer."""

    info: DatasetInfo
    columns: tuple[ColumnInfo, ...]
    grant: CatalogGrant
    limits: Limits
    obligations: Mapping[str, Any]
    shaping: Shaping = field(default_factory=Shaping)


class Provider:
    """Answers peers' catalog, explain and query requests for one member's connector."""

    def __init__(
        self,
        member_id: str,
        dataspace: str,
        sandbox: SandboxDatabase,
        policies: PolicyRegistry,
        signer: ReceiptSigner,
        *,
        audit: AuditLog,
        quotas: QuotaLedger,
        revoked: Revocations,
        guard: Callable[[str], QueryShape] = inspect_query,
        mask_key: bytes,
        batch_rows: int,
        max_query_seconds: float,
        max_concurrent_queries: int,
    ) -> None:
        self.member_id = member_id
        self.dataspace = dataspace
        self.sandbox = sandbox
        self.policies = policies
        self.signer = signer
        self.audit = audit
        self.quotas = quotas
        # Replaceable only so a test can show the sandbox stops attacks without the guard.
        self.guard = guard
        self.mask_key = mask_key
        self.revoked = revoked
        self.batch_rows = batch_rows
        self.max_query_seconds = max_query_seconds
        self._slots = threading.BoundedSemaphore(max_concurrent_queries)

    def record(self, entry: AuditEntry, error: BaseException | None = None) -> int:
        """Append the request's audit entry (once), with the outcome an error implies."""
        if error is not None:
            entry.outcome = next(
                (name for kind, name in OUTCOMES if isinstance(error, kind)), "failed"
            )
            if isinstance(error, PermissionDenied):
                entry.decision, entry.reasons = "deny", tuple(error.reasons)
            elif isinstance(error, ConnectorError):
                entry.reasons = (error.message,)
        return self.audit.append(entry)

    def authenticate(self, cert_pem: bytes | None, entry: AuditEntry) -> MemberIdentity:
        """The member a TLS-verified peer certificate names, refusing revoked ones."""
        identity = self._identity(cert_pem)
        entry.member_id = identity.member_id
        revoked = self.revoked
        if identity.member_id in revoked.members or identity.serial in revoked.serials:
            raise NotAuthenticated(
                f"member {identity.member_id!r} or its certificate is revoked by this connector; "
                "ask the provider's IT team"
            )
        return identity

    def _identity(self, cert_pem: bytes | None) -> MemberIdentity:
        if not cert_pem:
            raise NotAuthenticated("no client certificate was presented")
        try:
            identity = member_identity(x509.load_pem_x509_certificate(cert_pem))
        except ValueError:
            raise NotAuthenticated("the client certificate could not be read") from None
        if identity.dataspace != self.dataspace:
            raise NotAuthenticated(
                f"the certificate belongs to data space {identity.dataspace!r}; this connector "
                f"serves {self.dataspace!r}"
            )
        return identity

    def catalog(self, member: MemberIdentity, entry: AuditEntry) -> list[CatalogDataset]:
        """The datasets granted to member now, with only the granted columns (audited)."""
        datasets = self.sandbox.datasets()
        snapshot = self.policies.snapshot
        listed = []
        for grant in snapshot.engine.catalog(member.member_id, _now()):
            info = datasets.get(grant.dataset)
            if info is None:
                log.warning("policy grants dataset %r, which holds no data yet", grant.dataset)
                continue
            policies = [snapshot.by_id[i] for i, _ in grant.policies if i in snapshot.by_id]
            obligations = {p.id: dataclasses.asdict(p.obligations) for p in policies}
            shaping = strictest([p.shaping for p in policies])
            columns = visible_columns(info, set(grant.columns), shaping)
            listed.append(
                CatalogDataset(
                    info,
                    columns,
                    grant,
                    Limits.tightest(p.limits for p in policies),
                    obligations,
                    shaping,
                )
            )
        entry.datasets = tuple(d.info.name for d in listed)
        entry.outcome = "answered"
        self.record(entry)
        return listed

    def explain(
        self, member: MemberIdentity, request: PeerRequest, entry: AuditEntry
    ) -> Explanation:
        """Decide and plan a query without running it (audited)."""
        explanation = self._explain(member, request, entry)
        entry.outcome = "answered"
        self.record(entry)
        return explanation

    def _explain(
        self, member: MemberIdentity, request: PeerRequest, entry: AuditEntry
    ) -> Explanation:
        shape = self.guard(request.sql)
        entry.datasets = shape.datasets
        snapshot = self.policies.snapshot  # one load for the decision and its limits
        decision = self._decide(snapshot.engine, member, request, shape)
        relations: tuple[Relation, ...] = ()
        if decision.allow:
            try:
                relations = relations_for(
                    decision, self.sandbox.datasets(), snapshot.by_id, self.mask_key
                )
            except PermissionDenied as denied:
                decision = Decision(False, tuple(denied.reasons))
        entry.decision = "allow" if decision.allow else "deny"
        entry.reasons = decision.reasons
        entry.policies = policy_uses(decision.policies)
        entry.obligations = dict(decision.obligations)
        entry.columns = {
            r.dataset: [c for c in r.column_names if shape.uses_star or c in shape.column_refs]
            for r in relations
        }
        sql = aggregate_form(request.sql, shape.datasets, relations) if decision.allow else ""
        used = [snapshot.by_id[p.id] for p in entry.policies if p.id in snapshot.by_id]
        quotas = tuple(
            PolicyQuota(p.id, p.limits.queries_per_day, p.limits.rows_per_day)
            for p in used
            if p.limits.queries_per_day or p.limits.rows_per_day
        )
        max_rows = Limits.tightest(p.limits for p in used).max_rows_per_query
        return Explanation(shape, decision, relations, quotas, max_rows, sql)

    def query(self, member: MemberIdentity, request: PeerRequest, entry: AuditEntry) -> QueryRun:
        """Check and start a query; raises before anything is sent when it is not allowed."""
        explanation = self._explain(member, request, entry)
        if not explanation.decision.allow:
            raise PermissionDenied(list(explanation.decision.reasons))
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(
                "this connector is answering its maximum number of queries; retry shortly"
            )
        try:
            self.quotas.claim_query(member.member_id, explanation.quotas, _now())
            return QueryRun(self, member, request, explanation, entry)
        except BaseException:
            self._slots.release()
            raise

    def release_slot(self) -> None:
        """Called by a QueryRun when it ends."""
        self._slots.release()

    def _decide(
        self, engine: PolicyEngine, member: MemberIdentity, request: PeerRequest, shape: QueryShape
    ) -> Decision:
        datasets = self.sandbox.datasets()
        columns = {
            name: frozenset(c.name for c in datasets[name].columns if c.name in shape.column_refs)
            if name in datasets
            else frozenset()
            for name in shape.datasets
        }
        return engine.decide(
            DecisionRequest(
                member=member.member_id,
                purpose=request.purpose,
                datasets=shape.datasets,
                columns=columns,
                uses_star=shape.uses_star,
                time=_now(),
            )
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
