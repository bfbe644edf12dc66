"""The answering side, free of any transport: who asks, what policy says, what is sent back.

`Provider` wires identity -> guard -> policy -> enforce -> store -> receipt. The gRPC
servicer only converts messages and maps the exceptions raised here to status codes.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping

from connector.aggregates import aggregate_form
from connector.audit import AuditLog
from connector.audit_entry import AuditEntry
from connector.authentication import (
    certificate_member,
    refuse_revoked_certificate,
    refuse_revoked_spiffe,
    spiffe_member,
)
from connector.config import Revocations
from connector.decided import Decided, decided, record_decision
from connector.decision_cache import DecisionCache
from connector.enforce import Relation, relations_for
from connector.errors import (
    ConnectorError,
    PermissionDenied,
    QueryRejected,
    ResourceExhausted,
)
from connector.identity import MemberIdentity
from connector.incremental import row_ranges
from connector.noise import (
    PrivacyCharge,
    charges,
    load_mechanisms,
    noise_plan,
)
from connector.packing import packing_refused
from connector.peer_catalog import CatalogDataset, granted_catalog
from connector.policy.consistency import conflicts_for
from connector.policy.engine import Decision, DecisionRequest
from connector.policy.model import Limits
from connector.policy.ref import policy_refs
from connector.policy.registry import PolicyRegistry, PolicySnapshot
from connector.query_run import QueryRun
from connector.quota import PolicyQuota, QuotaLedger
from connector.rate import RateLimit
from connector.receipt import ReceiptSigner
from connector.request import Explanation, PeerRequest
from connector.sandbox import SandboxDatabase
from connector.slots import QuerySlots, StallWatch
from connector.sqlguard import QueryShape, inspect_query
from connector.store import DatasetInfo

log = logging.getLogger(__name__)


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
        mask_consistency: str = "warn",
        explains_per_minute: int = 60,
        max_concurrent_queries_per_member: int = 0,
        stall_seconds: float = 30.0,
        clock: Callable[[], dt.datetime] | None = None,
    ) -> None:
        """clock: the time decisions are taken at (default: now; replay passes a request's)."""
        load_mechanisms()
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
        per_member = max_concurrent_queries_per_member or max(1, max_concurrent_queries // 2)
        self.slots = QuerySlots(max_concurrent_queries, per_member)
        self.stall_watch = StallWatch(stall_seconds)
        self._pruned_for: object = None  # the policy snapshot the shaped copies follow
        self.decisions = DecisionCache()  # emptied by any new policy snapshot or revocations
        self.mask_consistency = mask_consistency
        # Explain costs no quota: without a limit it would be a free probe.
        self._explains = RateLimit(explains_per_minute)
        self.clock = clock or _now

    def record(self, entry: AuditEntry, error: BaseException | None = None) -> int:
        """Append the request's audit entry (once), with the outcome an error implies."""
        if error is not None:
            entry.outcome = error.outcome if isinstance(error, ConnectorError) else "failed"
            if isinstance(error, PermissionDenied):
                entry.decision, entry.reasons = "deny", tuple(error.reasons)
            elif isinstance(error, ConnectorError):
                entry.reasons = (error.message,)
        return self.audit.append(entry)

    def authenticate(self, cert_pem: bytes | None, entry: AuditEntry) -> MemberIdentity:
        """The member a TLS-verified peer certificate names, refusing revoked ones."""
        identity = certificate_member(cert_pem, self.dataspace)
        entry.member_id = identity.member_id
        refuse_revoked_certificate(identity, self.revoked)
        return identity

    def authenticate_spiffe_id(self, uri: str, entry: AuditEntry) -> MemberIdentity:
        """The member a TLS-verified SPIFFE id names, for a transport that cannot see the
        certificate's serial: while any serial is revoked, nobody (fail closed)."""
        identity = spiffe_member(uri, self.dataspace)
        entry.member_id = identity.member_id
        refuse_revoked_spiffe(identity, self.revoked)
        return identity

    def catalog(self, member: MemberIdentity, entry: AuditEntry) -> list[CatalogDataset]:
        """The datasets granted to member now, with only the granted columns (audited)."""
        listed = granted_catalog(
            member.member_id, self.policies.snapshot, self.sandbox.datasets(), self.quotas, _now()
        )
        entry.datasets = tuple(d.info.name for d in listed)
        entry.outcome = "answered"
        self.record(entry)
        return listed

    def explain(
        self, member: MemberIdentity, request: PeerRequest, entry: AuditEntry
    ) -> Explanation:
        """Decide and plan a query without running it (audited; rate-limited per member)."""
        wait = self._explains.take(member.member_id)
        if wait:
            raise ResourceExhausted(
                f"more than {self._explains.per_minute} explain requests a minute from you; "
                f"retry in {wait:.0f} s"
            )
        explanation = self._explain(member, request, entry)
        entry.outcome = "answered"
        self.record(entry)
        return explanation

    def dry_run(
        self, member: MemberIdentity, request: PeerRequest, entry: AuditEntry
    ) -> Explanation:
        """Explain without rate limit or audit entry: for the owner's own tools, never peers."""
        return self._explain(member, request, entry)

    def explain_at(self, member_id: str, request: PeerRequest, at: dt.datetime) -> Explanation:
        """Explain's decision and plan as of `at`, for policy tests: nothing is recorded and
        no rate limit applies (the caller builds a Provider of its own for them)."""
        member = MemberIdentity(self.dataspace, member_id, member_id, 0)
        return self._explain(member, request, AuditEntry("explain"), at)

    def _explain(
        self,
        member: MemberIdentity,
        request: PeerRequest,
        entry: AuditEntry,
        at: dt.datetime | None = None,
        snapshot: PolicySnapshot | None = None,
    ) -> Explanation:
        shape = self.guard(request.sql)
        entry.datasets = shape.datasets
        snapshot = snapshot or self.policies.snapshot  # one load for the decision and limits
        if snapshot is not self._pruned_for:
            self.prune_shaped_copies()
        # Generation first: a commit between the two reads makes the query decide again.
        generation = self.sandbox.gate.generation
        datasets = self.sandbox.datasets()
        decision = self._decide(
            snapshot, member, request, shape, at or self.clock(), datasets=datasets
        )
        if decision.allow and self.mask_consistency == "refuse":
            clashes = conflicts_for(snapshot.mask_conflicts, member.member_id, shape.datasets)
            if clashes:
                decision = Decision(False, tuple(c.peer_reason() for c in clashes))
        relations: tuple[Relation, ...] = ()
        unbound: QueryRejected | None = None
        ranges = (
            row_ranges(request.since_version, shape.datasets, datasets, self.sandbox.rows_at)
            if decision.allow
            else {}
        )
        if decision.allow:
            try:
                relations = relations_for(decision, datasets, snapshot.by_id, self.mask_key, ranges)
                # Before any form check, copy or data: a name that does not exist is refused
                # exactly as a hidden one (no oracle through Explain, errors or timing).
                self.sandbox.check_names(request.sql, relations, shape.datasets)
            except QueryRejected as error:
                # Not a missing name (that is PermissionDenied): a type or form the binder
                # refuses. The aggregate-only form check below says it better, if it applies.
                unbound = error
            except PermissionDenied as denied:
                decision, relations = Decision(False, tuple(denied.reasons)), ()
        used = [snapshot.by_id[i] for i, _ in decision.policies if i in snapshot.by_id]
        limits = Limits.tightest(p.limits for p in used)
        entry.policies = policy_refs(decision.policies)  # also the ones whose limits refuse
        if decision.allow and shape.packing and limits.limits_rows:
            decision = Decision(False, (packing_refused(shape.packing),))
            relations = ()
        record_decision(entry, decision, relations, shape)
        sql = aggregate_form(request.sql, shape.datasets, relations) if decision.allow else ""
        if unbound is not None and decision.allow:
            raise unbound
        quotas = tuple(
            PolicyQuota(p.id, lim.queries_per_day, lim.rows_per_day, lim.bytes_per_day)
            for p in used
            if (lim := p.limits).queries_per_day or lim.rows_per_day or lim.bytes_per_day
        )
        noisy = next((r for r in relations if r.shaping.noise), None) if sql else None
        plan = noise_plan(request.sql, noisy) if noisy is not None else None
        noising = [(p.id, p.shaping.noise) for p in used if p.shaping.noise]
        privacy = charges(plan.noise, [i for i, _ in noising]) if plan is not None else ()
        return Explanation(
            shape,
            decision,
            relations,
            quotas,
            max_rows=limits.max_rows_per_query,
            max_bytes=limits.max_bytes_per_query,
            sql=sql,
            noise=plan,
            privacy=privacy,
            budget=self.quotas.privacy_budget(member.member_id, noising, _now()),
            generation=generation,
            versions=tuple((r.dataset, r.since, r.version) for r in relations),
        )

    def query(
        self,
        member: MemberIdentity,
        request: PeerRequest,
        entry: AuditEntry,
        deadline_seconds: float | None = None,
        decided: Decided | None = None,
    ) -> QueryRun:
        """Check and start a query; raises before anything is sent when it is not allowed.
        deadline_seconds bounds the wait for a slot (None: the peer set no deadline).
        decided: this query's decision taken earlier (Provider.checked), used instead of
        deciding again while nothing it depends on changed."""
        explanation = self._reuse(decided, member, request, entry)
        if explanation is None:
            decided, explanation = None, self.check(member, request, entry)
        slot = self.slots.acquire(member.member_id, deadline_seconds=deadline_seconds)
        # From here until its query starts (and DuckDB holds its snapshot), no new data is
        # committed: the query reads exactly the versions it was decided on (commit_gate.py).
        gate_pass = self.sandbox.gate.enter()
        try:
            moved = gate_pass.generation != explanation.generation
            if moved or (decided is not None and not self._holds(decided, member, request)):
                # New data came in (or, while a reused decision waited for its slot, the
                # policies, revocations or the clock's slot changed): decide again.
                explanation = self._explain(member, request, entry)
                if not explanation.decision.allow:
                    raise PermissionDenied(list(explanation.decision.reasons))
            self.quotas.claim_query(member.member_id, explanation.quotas, _now())
            self._spend_privacy(member.member_id, explanation.privacy)
            run = QueryRun(
                self, member, request, explanation, entry, slot=slot, gate_pass=gate_pass
            )
        except BaseException:
            gate_pass.leave()
            slot.finish()
            raise
        self.stall_watch.watch(run)
        return run

    def check(self, member: MemberIdentity, request: PeerRequest, entry: AuditEntry) -> Explanation:
        """The decision query() would take now, raising as it would; runs and records nothing
        (a transport's control step before the answer is fetched)."""
        explanation = self._explain(member, request, entry)
        if not explanation.decision.allow:
            raise PermissionDenied(list(explanation.decision.reasons))
        return explanation

    def checked(
        self,
        member: MemberIdentity,
        request: PeerRequest,
        entry: AuditEntry,
        earlier: Decided | None = None,
    ) -> Decided:
        """check(), with what the decision depends on: query(decided=...) runs the query
        without deciding again while none of that changed. earlier: a decision taken before
        for the same query, returned as it is while nothing it depends on (data included)
        changed."""
        if (
            earlier is not None
            and earlier.explanation.generation == self.sandbox.gate.generation
            and self._reuse(earlier, member, request, entry) is not None
        ):
            return earlier
        snapshot, revoked, at = self.policies.snapshot, self.revoked, self.clock()
        explanation = self._explain(member, request, entry, at, snapshot)
        if not explanation.decision.allow:
            raise PermissionDenied(list(explanation.decision.reasons))
        slot = self.decisions.time_span(snapshot, at)
        return decided(
            member.member_id,
            request,
            explanation,
            entry,
            snapshot=snapshot,
            revoked=revoked,
            slot=slot,
        )

    def _reuse(
        self,
        earlier: Decided | None,
        member: MemberIdentity,
        request: PeerRequest,
        entry: AuditEntry,
    ) -> Explanation | None:
        """earlier's Explanation, its audit fields copied to entry, if deciding again now
        would take the same decision (the data generation is compared by the caller)."""
        if earlier is None or not self._holds(earlier, member, request):
            return None
        return earlier.restore(entry)

    def _holds(self, earlier: Decided, member: MemberIdentity, request: PeerRequest) -> bool:
        snapshot, revoked = self.policies.snapshot, self.revoked
        return earlier.holds(member.member_id, request, snapshot, revoked, self.clock())

    def _spend_privacy(self, member_id: str, privacy: tuple[PrivacyCharge, ...]) -> None:
        """Claim a noisy query's epsilon before it runs (Explain never spends any)."""
        if privacy:
            self.quotas.claim_privacy(member_id, privacy, _now())

    def prune_shaped_copies(self) -> None:
        """Drop the shaped copies that no policy in force can use (called when they change)."""
        snapshot = self.policies.snapshot
        self._pruned_for = snapshot
        self.sandbox.shaped.keep_reachable(
            {(d, p.shaping.canonical()) for p in snapshot.policies for d in p.datasets}
        )

    def decide(
        self, member: MemberIdentity, request: PeerRequest, shape: QueryShape, time: dt.datetime
    ) -> Decision:
        """The policy decision alone for a checked query at time (from the cache when the same
        request was decided under the policies and revocations in force)."""
        return self._decide(
            self.policies.snapshot, member, request, shape, time, datasets=self.sandbox.datasets()
        )

    def _decide(
        self,
        snapshot: PolicySnapshot,
        member: MemberIdentity,
        request: PeerRequest,
        shape: QueryShape,
        time: dt.datetime,
        *,
        datasets: Mapping[str, DatasetInfo],
    ) -> Decision:
        columns = {
            name: frozenset(c.name for c in datasets[name].columns if c.name in shape.column_refs)
            if name in datasets
            else frozenset()
            for name in shape.datasets
        }
        return self.decisions.decide(
            snapshot,
            self.revoked,
            DecisionRequest(
                member=member.member_id,
                purpose=request.purpose,
                datasets=shape.datasets,
                columns=columns,
                uses_star=shape.uses_star,
                time=time,
            ),
        )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
