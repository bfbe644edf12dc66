"""Ask many members one question at once and combine their answers.

    from connector.federation import FederatedQuery
    query = FederatedQuery.from_home("homes/carmaker", ["role:supplier"], timeout=30)
    result = query.run(
        "SELECT plant, sum(defects) FROM part_defects GROUP BY plant", "quality-benchmarking")
    result.table                       # the combined answer (pyarrow.Table)
    [r.outcome for r in result.reports]  # answered, refused, unreachable, timed out, ...

Every member is asked in parallel, each with its own deadline, and applies its own
policies; one member's refusal or outage is reported, not fatal. A member named through the
directory must present a certificate with its SPIFFE id before the query is sent, and every
answer's receipt is verified on arrival against the data space's CA.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa

from connector.client import Peer, PeerIdentity
from connector.config import load_settings
from connector.errors import (
    ConnectorError,
    FederationIncomplete,
    NotFederable,
    PeerError,
    QueryTimeout,
    WrongIdentity,
)
from connector.federated_answers import (
    ANSWERED,
    FAILED,
    FEDERATION_METADATA_KEY,
    REFUSED,
    TIMED_OUT,
    UNREACHABLE,
    WRONG_IDENTITY,
    FederatedResult,
    MemberReport,
    check_answer_shape,
    combined_or_refused,
    federation_report_of,
    incomplete_groups,
    outcome_of,
    part_path,
    report_json,
    union,
)
from connector.federated_plan import AGGREGATE, FederationPlan
from connector.federated_sql import plan_federation
from connector.federated_stream import read_answer
from connector.federation_targets import (
    ROLE_PREFIX,
    Target,
    check_member_endpoint,
    dataspace_of,
    resolve_targets,
)
from connector.held_directory import load_held
from connector.jws import JwsError
from connector.receipt import ReceiptBundle, verify_bundle

__all__ = [
    "ANSWERED",
    "FAILED",
    "REFUSED",
    "TIMED_OUT",
    "UNREACHABLE",
    "WRONG_IDENTITY",
    "FederatedQuery",
    "FederatedResult",
    "FederationIncomplete",
    "MemberReport",
    "Target",
    "WrongIdentity",
    "check_member_endpoint",
    "federation_report_of",
    "resolve_targets",
]

Progress = Callable[[MemberReport, int, int, int], None]  # report, done, total, rows so far


class FederatedQuery:
    """One question for many members, in parallel, each with its own deadline."""

    def __init__(
        self,
        identity: PeerIdentity,
        targets: Sequence[Target],
        *,
        timeout: float = 60.0,
        progress: Progress | None = None,
        parts_to: Path | None = None,
    ) -> None:
        """parts_to: keep each member's exact Arrow bytes as PARTS_TO.<label>.arrow."""
        self.identity = identity
        self.targets = list(targets)
        self.timeout = timeout
        self.progress = progress
        self.parts_to = parts_to
        self._dataspace = dataspace_of(identity)
        self._max_rows = 0

    @classmethod
    def from_home(
        cls,
        home: Path | str,
        to: Sequence[str] = (),
        *,
        everyone: bool = False,
        timeout: float = 60.0,
    ) -> FederatedQuery:
        """Ask as the member of home, the members `to` names (ids, role:ROLE, HOST:PORT) and
        with everyone=True all of them, resolved through the directory the home holds."""
        settings = load_settings(Path(home))
        identity = PeerIdentity.from_files(settings.cert, settings.key, settings.ca)
        needs_directory = everyone or any(":" not in s or s.startswith(ROLE_PREFIX) for s in to)
        directory = (
            load_held(settings.home, identity.ca_pem, settings.dataspace)
            if needs_directory
            else None
        )
        targets = resolve_targets(
            to, everyone=everyone, directory=directory, own_member=settings.member_id
        )
        return cls(identity, targets, timeout=timeout)

    def plan(self, sql: str, *, per_member: bool = False) -> FederationPlan:
        """How sql is asked (NotFederable before anything is sent)."""
        return plan_federation(sql, per_member=per_member)

    def run(
        self,
        sql: str,
        purpose: str,
        *,
        per_member: bool = False,
        require_all: bool = False,
        max_rows: int = 0,
    ) -> FederatedResult:
        """Ask every target; FederationIncomplete with require_all when one did not answer
        in full. max_rows cuts each member's answer (not with partial aggregates)."""
        plan = self.plan(sql, per_member=per_member)
        if max_rows and plan.kind == AGGREGATE and not per_member:
            raise NotFederable(
                "a row limit would cut members' partial groups and the combination would be "
                "wrong: use LIMIT in the query (applied after combining), or --per-member"
            )
        self._max_rows = max_rows
        reports = [MemberReport(t.label, t.address, t.member_id) for t in self.targets]
        tables: dict[str, pa.Table] = {}
        done, rows = 0, 0
        workers = max(1, min(32, len(self.targets)))
        with concurrent.futures.ThreadPoolExecutor(workers, "federated") as pool:
            futures = {
                pool.submit(self._ask, target, report, plan, purpose): report
                for target, report in zip(self.targets, reports, strict=True)
            }
            for future in concurrent.futures.as_completed(futures):
                report = futures[future]
                table = future.result()
                if table is not None:
                    tables[report.label] = table
                done += 1
                rows += report.rows
                if self.progress is not None:
                    self.progress(report, done, len(reports), rows)
        if require_all and not all(r.answered and not r.cut for r in reports):
            missing = ", ".join(
                f"{r.label} ({'cut at a limit' if r.answered else r.outcome})"
                for r in reports
                if not r.answered or r.cut
            )
            raise FederationIncomplete(f"not every member answered: {missing}")
        answered = [(r, tables[r.label]) for r in reports if r.label in tables]
        result = self._combined(plan, answered, reports, per_member)
        result.sql = sql
        return result

    def _combined(
        self,
        plan: FederationPlan,
        answered: list[tuple[MemberReport, pa.Table]],
        reports: list[MemberReport],
        per_member: bool,
    ) -> FederatedResult:
        if plan.kind == AGGREGATE and not per_member:
            table = combined_or_refused(plan, answered)
            result = FederatedResult(table, plan, reports, False, incomplete_groups(plan, answered))
        else:
            try:
                table = union(answered)
            except pa.ArrowException as exc:
                raise PeerError(
                    f"the members answered with columns of different types ({exc}); ask them "
                    "one by one, or cast the columns in the query"
                ) from None
            result = FederatedResult(table, plan, reports, per_member)
        metadata = dict(result.table.schema.metadata or {})
        metadata[FEDERATION_METADATA_KEY] = json.dumps(report_json(result), default=str).encode()
        result.table = result.table.replace_schema_metadata(metadata)
        return result

    def _ask(
        self, target: Target, report: MemberReport, plan: FederationPlan, purpose: str
    ) -> pa.Table | None:
        started = time.monotonic()
        deadline = started + self.timeout
        try:
            return self._answer(target, report, plan, purpose, deadline)
        except Exception as error:
            report.outcome, report.detail = outcome_of(error)
            if report.part_file is not None:
                report.part_file.unlink(missing_ok=True)
                report.part_file = None
            return None
        finally:
            report.seconds = time.monotonic() - started

    def _answer(
        self,
        target: Target,
        report: MemberReport,
        plan: FederationPlan,
        purpose: str,
        deadline: float,
    ) -> pa.Table:
        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QueryTimeout("no time left")
            return remaining

        check_member_endpoint(target, self.identity, self._dataspace, left())
        with Peer(target.address, self.identity, timeout=left()) as peer:
            entries = peer.catalog()
            report.min_group_size = max(
                (e.min_group_size for e in entries if e.name in plan.datasets), default=0
            )
            endorsement, certificate = peer.provider_proof()
            peer.timeout = left()
            table, token, digest = self._fetch(peer, report, plan.member_sql, purpose)
        bundle = ReceiptBundle(token, endorsement, certificate)
        try:
            fields = verify_bundle(bundle, self.identity.ca_pem, None)
        except (JwsError, ConnectorError) as exc:
            raise PeerError(f"the receipt from {target.address} does not verify: {exc}") from None
        if fields.result_sha256 != digest:
            raise PeerError(f"the receipt from {target.address} does not match the data sent")
        if target.member_id and fields.provider_id != target.member_id:
            raise WrongIdentity(
                f"{target.address} answered as {fields.provider_id}, not as {target.member_id}"
            )
        check_answer_shape(plan, table, target.address)
        if fields.truncated:
            report.cut = True
            report.detail = f"cut at the limit {fields.limited_by or 'of rows'}"
        report.outcome, report.rows, report.receipt, report.bundle = (
            ANSWERED,
            table.num_rows,
            fields,
            bundle,
        )
        return table

    def _fetch(
        self, peer: Peer, report: MemberReport, sql: str, purpose: str
    ) -> tuple[pa.Table, str, str]:
        if self.parts_to is None:
            return read_answer(peer, sql, purpose, None, self._max_rows)
        report.part_file = part_path(self.parts_to, report.label)
        with report.part_file.open("wb") as sink:
            return read_answer(peer, sql, purpose, sink, self._max_rows)
