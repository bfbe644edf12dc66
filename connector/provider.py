"""The answering side, free of any transport: who asks, what policy says, what is sent back.

`Provider` wires identity -> guard -> policy -> enforce -> store -> receipt. The gRPC
servicer only converts messages and maps the exceptions raised here to status codes.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from cryptography import x509

from connector.aggregates import AggregateTerms, aggregate_form_help, aggregate_only_query
from connector.arrow_stream import IpcPieces
from connector.audit import AuditEntry, AuditLog
from connector.config import Revocations
from connector.enforce import Relation, relations_for, visible_columns
from connector.errors import (
    ConnectorError,
    NotAuthenticated,
    PermissionDenied,
    QueryCancelled,
    QueryRejected,
    QueryTimeout,
    ResourceExhausted,
    StoreError,
)
from connector.identity import MemberIdentity, member_identity
from connector.policy.engine import CatalogGrant, Decision, DecisionRequest, PolicyEngine
from connector.policy.model import Limits, UsagePolicy
from connector.policy.registry import PolicyRegistry
from connector.quota import PolicyQuota, QuotaLedger
from connector.receipt import PolicyUse, ReceiptFields, ReceiptSigner, policy_uses
from connector.sandbox import SandboxSession, Store
from connector.shaping import Shaping, strictest
from connector.sqlguard import QueryShape, inspect_query
from connector.store import ColumnInfo, DatasetInfo

log = logging.getLogger(__name__)

OUTCOMES: tuple[tuple[type[ConnectorError], str], ...] = (
    (NotAuthenticated, "unauthenticated"),
    (PermissionDenied, "denied"),
    (QueryRejected, "rejected"),
    (ResourceExhausted, "exhausted"),
    (QueryTimeout, "timeout"),
    (QueryCancelled, "cancelled"),
)
OBLIGATIONS_METADATA_KEY = "connector.obligations"
POLICIES_METADATA_KEY = "connector.policies"
_PURPOSE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,127}$")
_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


@dataclass(frozen=True)
class PeerRequest:
    """A peer's query request, its fields checked (they are hostile input)."""

    sql: str
    purpose: str
    max_rows: int
    request_id: str

    @classmethod
    def checked(cls, sql: str, purpose: str, max_rows: int, request_id: str) -> PeerRequest:
        """Validate the fields; QueryRejected says which one is wrong and how to fix it."""
        if not _PURPOSE.fullmatch(purpose):
            raise QueryRejected(
                "purpose must be 1-128 letters, digits, spaces or . _ : / - (the purpose your "
                "catalog lists for the dataset)"
            )
        if request_id and not _REQUEST_ID.fullmatch(request_id):
            raise QueryRejected("request_id must be 1-128 printable ASCII characters, or empty")
        if max_rows < 0:
            raise QueryRejected("max_rows must not be negative")
        return cls(sql, purpose, max_rows, request_id or str(uuid.uuid4()))


@dataclass(frozen=True)
class CatalogDataset:
    """One dataset as a peer sees it: only the columns and terms granted to that peer."""

    info: DatasetInfo
    columns: tuple[ColumnInfo, ...]
    grant: CatalogGrant
    limits: Limits
    obligations: Mapping[str, Any]
    shaping: Shaping = field(default_factory=Shaping)


@dataclass(frozen=True)
class Explanation:
    """The dry run of a query: the decision and the relations it would run on."""

    shape: QueryShape
    decision: Decision
    relations: tuple[Relation, ...]
    quotas: tuple[PolicyQuota, ...] = ()
    max_rows: int = 0  # the tightest max_rows_per_query of the policies used (0: none)
    sql: str = ""  # what runs: the peer's SQL, or its aggregate-only rewrite ("" if denied)


class Provider:
    """Answers peers' catalog, explain and query requests for one member's connector."""

    def __init__(
        self,
        member_id: str,
        dataspace: str,
        store: Store,
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
        self.store = store
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
        datasets = self.store.datasets()
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
                    info, columns, grant, tightest_limits(policies), obligations, shaping
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
                    decision, self.store.datasets(), snapshot.by_id, self.mask_key
                )
            except PermissionDenied as denied:
                decision = Decision(False, tuple(denied.reasons))
        entry.decision = "allow" if decision.allow else "deny"
        entry.reasons = decision.reasons
        entry.policies = decision_policies(decision)
        entry.obligations = dict(decision.obligations)
        entry.columns = {
            r.dataset: [c for c in r.column_names if shape.uses_star or c in shape.column_refs]
            for r in relations
        }
        sql = aggregate_form(request.sql, shape, relations) if decision.allow else ""
        used = [snapshot.by_id[p.id] for p in entry.policies if p.id in snapshot.by_id]
        quotas = tuple(
            PolicyQuota(p.id, p.limits.queries_per_day, p.limits.rows_per_day)
            for p in used
            if p.limits.queries_per_day or p.limits.rows_per_day
        )
        max_rows = tightest_limits(used).max_rows_per_query
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
        datasets = self.store.datasets()
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


class QueryRun:
    """One running query: yields Arrow IPC pieces, then its signed receipt."""

    def __init__(
        self,
        provider: Provider,
        member: MemberIdentity,
        request: PeerRequest,
        explanation: Explanation,
        entry: AuditEntry,
    ) -> None:
        self._provider = provider
        self.entry = entry
        self._member = member
        self._request = request
        self._explanation = explanation
        self._session: SandboxSession = provider.store.session()
        self._lock = threading.Lock()
        self._finished = False
        self.rows = 0
        self.truncated = False
        self._pieces: IpcPieces | None = None

    def cancel(self) -> None:
        """Interrupt the query in DuckDB (the peer went away or its deadline passed)."""
        with self._lock:
            if not self._finished:
                self._session.interrupt()

    def pieces(self, deadline_seconds: float | None = None) -> Generator[bytes, None, None]:
        """Run the query and yield Arrow IPC bytes; bounded memory whatever the result size."""
        timeout = self._provider.max_query_seconds
        if deadline_seconds is not None:
            timeout = max(0.001, min(timeout, deadline_seconds))
        try:
            sql = self._explanation.sql
            self._session.expose(self._explanation.relations)
            self._session.verify_plan(sql, self._explanation.relations)
            result = self._session.stream(sql, self._provider.batch_rows, timeout)
            pieces = self._pieces = IpcPieces(self._labelled(result.schema))
            cap = tightest((self._request.max_rows, self._explanation.max_rows))
            for whole in result:
                batch = whole
                if cap and self.rows + whole.num_rows > cap:
                    batch = whole.slice(0, cap - self.rows)
                    self.truncated = True
                batch = self._within_quota(batch)
                if batch.num_rows:
                    self.rows += batch.num_rows
                    yield pieces.encode(batch)
                if self.truncated:
                    break
            yield pieces.finish()
        except GeneratorExit:
            # The peer went away mid-stream: the query ends here and is on record as such.
            self._provider.record(self.entry, QueryCancelled("the peer cancelled the query"))
            raise
        finally:
            self.close()

    def _within_quota(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The part of batch the daily row quotas still allow (claimed before it is sent)."""
        quotas = self._explanation.quotas
        if not any(q.rows_per_day for q in quotas) or not batch.num_rows:
            return batch
        granted = self._provider.quotas.claim_rows(
            self._member.member_id, quotas, batch.num_rows, _now()
        )
        if granted < batch.num_rows:
            self.truncated = True
            return batch.slice(0, granted)
        return batch

    def _labelled(self, schema: pa.Schema) -> pa.Schema:
        """The result schema with the obligations and policies in its metadata, for the
        peer's tools."""
        decision = self._explanation.decision
        policies = [f"{p.id}@{p.version}" for p in decision_policies(decision)]
        return schema.with_metadata(
            {
                **(schema.metadata or {}),
                OBLIGATIONS_METADATA_KEY: json.dumps(dict(decision.obligations), sort_keys=True),
                POLICIES_METADATA_KEY: json.dumps(policies),
            }
        )

    def receipt(self) -> tuple[ReceiptFields, str]:
        """Record the completed run in the audit log, then sign its receipt."""
        if self._pieces is None:
            raise StoreError("the query produced no result to give a receipt for")
        entry = self.entry
        entry.rows, entry.bytes = self.rows, self._pieces.bytes_sent
        entry.result_sha256, entry.truncated = self._pieces.sha256, self.truncated
        entry.outcome = "answered"
        seq = self._provider.record(entry)
        fields = ReceiptFields(
            request_id=self._request.request_id,
            member_id=self._member.member_id,
            provider_id=self._provider.member_id,
            purpose=self._request.purpose,
            query_sha256=self._explanation.shape.sha256,
            result_sha256=self._pieces.sha256,
            rows=self.rows,
            bytes=self._pieces.bytes_sent,
            truncated=self.truncated,
            policies=decision_policies(self._explanation.decision),
            audit_seq=seq,
            obligations=dict(self._explanation.decision.obligations),
        )
        return fields, self._provider.signer.sign(fields)

    def close(self) -> None:
        """Release the DuckDB session and the query slot; safe to call more than once."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._session.close()
        self._provider.release_slot()


def aggregate_form(sql: str, shape: QueryShape, relations: tuple[Relation, ...]) -> str:
    """sql as it runs: rewritten to the aggregate-only form when it reads such a dataset."""
    limited = [r for r in relations if r.min_group_size]
    if not limited:
        return sql
    relation = limited[0]
    if shape.datasets != (relation.dataset,):
        help_text = aggregate_form_help(relation.dataset, relation.min_group_size)
        raise QueryRejected(
            "a query on an aggregate-only dataset may read no other dataset (no joins, unions "
            f"or subqueries over others); {help_text}"
        )
    return aggregate_only_query(
        sql,
        AggregateTerms(
            relation.dataset,
            frozenset(relation.column_names),
            relation.measurement_columns,
            relation.min_group_size,
        ),
    )


def tightest(limits: Iterable[int]) -> int:
    """The smallest positive limit (0 when none is set)."""
    return min((n for n in limits if n > 0), default=0)


def tightest_limits(policies: Iterable[UsagePolicy]) -> Limits:
    """Each kind of limit at its tightest over the policies (0 where none sets it)."""
    limits = [p.limits for p in policies]
    return Limits(
        max_rows_per_query=tightest(lim.max_rows_per_query for lim in limits),
        queries_per_day=tightest(lim.queries_per_day for lim in limits),
        rows_per_day=tightest(lim.rows_per_day for lim in limits),
    )


def decision_policies(decision: Decision) -> tuple[PolicyUse, ...]:
    """The policies (id, version) that the decision's grants rest on."""
    return policy_uses([p for grant in decision.grants for p in grant.policies])


def obligations_json(obligations: Mapping[str, Any]) -> str:
    """Obligations as canonical JSON text (empty when there are none)."""
    return json.dumps(dict(obligations), sort_keys=True) if obligations else ""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
