"""Federated answers: each member's report, and combining the members' tables into one."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from connector.errors import (
    ConnectorError,
    NotAuthenticated,
    PeerError,
    PeerUnreachable,
    PermissionDenied,
    QueryRejected,
    QueryTimeout,
    ResourceExhausted,
    Unavailable,
    WrongIdentity,
)
from connector.federated_plan import AGGREGATE, MEMBER_COLUMN, FederationPlan, combine, group_keys
from connector.receipt import ReceiptBundle, ReceiptFields

ANSWERED = "answered"
REFUSED = "refused"
UNREACHABLE = "unreachable"
TIMED_OUT = "timed out"
WRONG_IDENTITY = "wrong identity"
FAILED = "failed"
FEDERATION_METADATA_KEY = b"connector.federation"


# ---------------------------------------------------------------------------------------
# Asking one member


@dataclass
class MemberReport:
    """One member's outcome: answered (rows, receipt), refused (why), unreachable, ..."""

    label: str
    address: str
    member_id: str
    outcome: str = ""
    detail: str = ""
    rows: int = 0
    seconds: float = 0.0
    min_group_size: int = 0  # the member answers only groups of at least this many rows
    cut: bool = False  # the member cut its answer at a limit (receipt: truncated)
    receipt: ReceiptFields | None = None
    bundle: ReceiptBundle | None = None
    part_file: Path | None = None

    @property
    def answered(self) -> bool:
        """True when the member's answer is part of the result."""
        return self.outcome == ANSWERED


def outcome_of(error: BaseException) -> tuple[str, str]:
    """The report's outcome and detail for why a member gave no answer."""
    if isinstance(error, WrongIdentity):
        return WRONG_IDENTITY, str(error)
    if isinstance(error, PermissionDenied):
        return REFUSED, "; ".join(error.reasons)
    if isinstance(error, QueryTimeout):
        return TIMED_OUT, "no complete answer before the deadline"
    if isinstance(error, PeerUnreachable):
        return UNREACHABLE, str(error)
    if isinstance(error, QueryRejected | ResourceExhausted | NotAuthenticated | Unavailable):
        return REFUSED, str(error)
    if isinstance(error, ConnectorError):
        return FAILED, str(error)
    return FAILED, f"{type(error).__name__}: {error}"


# ---------------------------------------------------------------------------------------
# Many members


@dataclass
class FederatedResult:
    """The combined answer and every member's report."""

    table: pa.Table
    plan: FederationPlan
    reports: list[MemberReport]
    per_member: bool = False
    incomplete_groups: list[dict[str, Any]] = field(default_factory=list)
    sql: str = ""  # the query as asked, from which the plan follows

    @property
    def complete(self) -> bool:
        """True when every member asked answered, and answered in full (none cut at a limit)."""
        return all(r.answered and not r.cut for r in self.reports)

    @property
    def kind(self) -> str:
        """union, aggregate or per-member: how the answers were combined."""
        return "per-member" if self.per_member else self.plan.kind


def report_json(result: FederatedResult) -> dict[str, Any]:
    """How the answer was made: every member's outcome, complete or not, missing groups."""
    return {
        "kind": result.kind,
        "complete": result.complete,
        "members": [
            {
                "member": r.label,
                "address": r.address,
                "outcome": r.outcome,
                "detail": r.detail,
                "rows": r.rows,
                "request_id": r.receipt.request_id if r.receipt else "",
            }
            for r in result.reports
        ],
        "incomplete_groups": result.incomplete_groups,
    }


def federation_report_of(table: pa.Table) -> dict[str, Any]:
    """The report FederatedQuery.run() put in the combined table's schema metadata."""
    raw = (table.schema.metadata or {}).get(FEDERATION_METADATA_KEY)
    if raw is None:
        raise PeerError("this table carries no federation report (it did not come from run())")
    report: dict[str, Any] = json.loads(raw)
    return report


def check_answer_shape(plan: FederationPlan, table: pa.Table, address: str) -> None:
    """PeerError when an answer is not what was asked: a partial answer without exactly the
    partial columns (numbers where they are summed), or a column named like `_member`."""
    if MEMBER_COLUMN in table.column_names:
        raise PeerError(
            f"{address} answered with a column named {MEMBER_COLUMN}, which the combined answer "
            "uses to name members; alias it in the query"
        )
    if plan.kind != AGGREGATE:
        return
    expected = [c for _, c in plan.groups] + [c for p in plan.aggregates for c in p.partials]
    if table.column_names != expected:
        raise PeerError(
            f"{address} did not answer the partial aggregates it was asked for (columns "
            f"{', '.join(table.column_names)}); its answer is left out"
        )
    for part in plan.aggregates:
        if part.function in ("min", "max"):
            continue
        for column in part.partials:
            kind = table.schema.field(column).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)
                    or pa.types.is_decimal(kind) or pa.types.is_null(kind)):  # fmt: skip
                raise PeerError(f"{address} answered {column} as {kind}, not as a number")


def combined_or_refused(
    plan: FederationPlan, answered: Sequence[tuple[MemberReport, pa.Table]]
) -> pa.Table:
    """The combined answer; PeerError when the members' partials do not combine (a group
    column of another type at one member, say)."""
    try:
        return combine(plan, [t for _, t in answered])
    except (pa.ArrowException, duckdb.Error) as exc:
        members = ", ".join(r.label for r, _ in answered)
        raise PeerError(
            f"the partial answers of {members} could not be combined ({exc}); ask with "
            "--per-member to see each member's answer"
        ) from None


def part_path(output: Path, label: str) -> Path:
    """Where a member's exact Arrow bytes are kept beside a combined result."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    return output.with_name(f"{output.name}.{safe}.arrow")


def _member_column(label: str, rows: int) -> pa.Array:
    """A constant column naming the member (dictionary-encoded: 4 bytes a row)."""
    indices = pa.repeat(pa.scalar(0, pa.int32()), rows)
    return pa.DictionaryArray.from_arrays(indices, pa.array([label], pa.string()))


def union(answered: Sequence[tuple[MemberReport, pa.Table]]) -> pa.Table:
    """The members' answers stacked, in the order asked, with `_member` first."""
    tables = [
        t.add_column(0, MEMBER_COLUMN, _member_column(r.label, t.num_rows)) for r, t in answered
    ]
    if not tables:
        return pa.table({MEMBER_COLUMN: pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="permissive")


def incomplete_groups(
    plan: FederationPlan, answered: Sequence[tuple[MemberReport, pa.Table]]
) -> list[dict[str, Any]]:
    """The groups some aggregate-only member may have dropped (too few of its rows): every
    group another member answered that such a member did not."""
    keys = {r.label: set(group_keys(plan, t)) for r, t in answered}
    every = set().union(*keys.values()) if keys else set()
    missing: dict[tuple[object, ...], list[str]] = {}
    for report, _ in answered:
        if report.min_group_size:
            for key in every - keys[report.label]:
                missing.setdefault(key, []).append(report.label)
    names = [output or column for output, column in plan.groups]
    return [
        {"group": dict(zip(names, key, strict=True)), "members": sorted(labels)}
        for key, labels in sorted(missing.items(), key=lambda item: repr(item[0]))
    ]
