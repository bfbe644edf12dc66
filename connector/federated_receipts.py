"""A federated result on disk: the combined file, each member's exact Arrow bytes beside
it, and FILE.receipts.json with one receipt per member and the plan that combined them.

`connector receipt verify FILE.receipts.json --data FILE` checks every receipt against its
member's bytes, then combines those bytes again and compares the result with FILE.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from connector.arrow_stream import read_ipc_pieces
from connector.errors import ConnectorError
from connector.federated_answers import FederatedResult, MemberReport, union
from connector.federated_plan import AGGREGATE, FederationPlan, combine
from connector.federated_sql import plan_federation
from connector.jws import JwsError, parse_json
from connector.receipt import ReceiptBundle, ReceiptFields, verify_bundle
from connector.result_files import TEXT_FORMATS, write_text
from connector.sqlbounds import DEFAULT_MAX_LENGTH, check_query_bounds

RECEIPTS_SUFFIX = ".receipts.json"
PER_MEMBER = "per-member"  # FederatedResult.kind when each answer is kept apart
# 2: the query is kept, and the plan is rebuilt from it (1 trusted the plan as written).
RECEIPTS_FORMAT = 2


def receipts_path(output: Path) -> Path:
    """Where the receipts of a federated result saved at output are kept."""
    return output.with_name(output.name + RECEIPTS_SUFFIX)


def save_result(result: FederatedResult, output: Path, data_format: str) -> Path:
    """Write the combined table in data_format and the receipts file; returns the latter."""
    if data_format == "arrow":
        with (
            pa.OSFile(str(output), "wb") as sink,
            pa.ipc.new_stream(sink, result.table.schema) as w,
        ):
            w.write_table(result.table)
    elif data_format == "parquet":
        pq.write_table(result.table, output)
    else:
        with output.open("w", encoding="utf-8", newline="") as out:
            write_text(result.table, data_format, out)
    document = {
        "format": RECEIPTS_FORMAT,
        "kind": result.kind,
        "sql": result.sql,
        "result": output.name,
        "data_format": data_format,
        "plan": result.plan.to_json(),
        "members": [_member_entry(r) for r in result.reports],
        "incomplete_groups": result.incomplete_groups,
    }
    path = receipts_path(output)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def _member_entry(report: MemberReport) -> dict[str, Any]:
    return {
        "member": report.label,
        "address": report.address,
        "member_id": report.member_id,
        "outcome": report.outcome,
        "detail": report.detail,
        "rows": report.rows,
        "part": report.part_file.name if report.part_file else None,
        "receipt": dataclasses.asdict(report.bundle) if report.bundle else None,
    }


def is_federated_receipts(path: Path) -> bool:
    """True for a receipts file of a federated result (by its name)."""
    return path.name.endswith(RECEIPTS_SUFFIX)


@dataclasses.dataclass(frozen=True)
class CheckedPart:
    """One member's receipt, checked against its bytes."""

    member: str
    fields: ReceiptFields


def verify_receipts(
    path: Path, ca_pem: bytes, data: Path | None
) -> tuple[list[CheckedPart], list[str], str]:
    """Every receipt of a receipts file checked against its member's bytes and the query
    the plan asks, the members that did not answer, and what was checked of the combined
    file; JwsError on any mismatch. Nothing unsigned in the file is believed: the plan is
    rebuilt from the query, which each receipt's query_sha256 binds."""
    document, plan = _document(path)
    checked: list[CheckedPart] = []
    tables: list[tuple[MemberReport, pa.Table]] = []
    silent = []
    for entry in document["members"]:
        if not isinstance(entry, dict):
            raise JwsError(f"{path} is not a federated receipts file (a member is not an object)")
        if entry.get("receipt") is None:
            silent.append(f"{entry.get('member')} ({entry.get('outcome')})")
            continue
        content, fields = _checked_part(path, entry, ca_pem)
        _check_binding(entry, fields, plan, checked)
        checked.append(CheckedPart(str(entry["member"]), fields))
        tables.append((MemberReport(str(entry["member"]), "", ""), read_ipc_pieces([content])))
    if data is None:
        return checked, silent, "receipts and each member's bytes (no --data given)"
    kind = str(document["kind"])
    expected = combine(plan, [t for _, t in tables]) if kind == AGGREGATE else union(tables)
    if not _matches(data, str(document.get("data_format", "arrow")), expected):
        raise JwsError(
            f"{data.name} is not the {kind} of the members' answers its receipts sign: it was "
            "changed after it was saved"
        )
    return checked, silent, f"receipts, each member's bytes, and {data.name} as their {kind}"


def _document(path: Path) -> tuple[dict[str, Any], FederationPlan]:
    """The receipts file and the plan its query makes (which the file must state)."""
    try:
        document = parse_json(path.read_bytes())
        kind, sql, members = str(document["kind"]), str(document["sql"]), document["members"]
        written = FederationPlan.from_json(document["plan"])
        if document.get("format") != RECEIPTS_FORMAT or not isinstance(members, list):
            raise ValueError(f"format {document.get('format')!r}, not {RECEIPTS_FORMAT}")
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise JwsError(f"{path} is not a federated receipts file ({exc})") from None
    try:
        # The file is hostile: its query meets the same pre-scan as a peer's before DuckDB's
        # parser reads it.
        check_query_bounds(sql, DEFAULT_MAX_LENGTH)
        plan = plan_federation(sql, per_member=kind == PER_MEMBER)
    except ConnectorError as exc:
        raise JwsError(f"{path}: its query cannot be planned again ({exc})") from None
    if plan.to_json() != written.to_json() or kind not in (plan.kind, PER_MEMBER):
        raise JwsError(
            f"{path}: the plan it states is not the one its query makes (the file was changed)"
        )
    return document, plan


def _checked_part(path: Path, entry: dict[str, Any], ca_pem: bytes) -> tuple[bytes, ReceiptFields]:
    try:
        # A name beside the receipts file, never a path elsewhere (with_name refuses '/').
        part = path.with_name(str(entry["part"]))
        bundle = ReceiptBundle(**{k: str(v) for k, v in entry["receipt"].items()})
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise JwsError(f"{path} is not a federated receipts file ({exc})") from None
    try:
        content = part.read_bytes()
    except OSError as exc:
        raise JwsError(f"cannot read {part.name}: {exc.strerror}") from None
    try:
        return content, verify_bundle(bundle, ca_pem, content)
    except JwsError as exc:
        raise JwsError(f"member {entry['member']} ({part.name}): {exc}") from None


def _check_binding(
    entry: dict[str, Any], fields: ReceiptFields, plan: FederationPlan, before: list[CheckedPart]
) -> None:
    """A receipt belongs to this result: it answers the plan's query, for the same member
    and purpose as the others, from a provider no other part came from, under its label."""
    label = str(entry["member"])
    if fields.query_sha256 != hashlib.sha256(plan.member_sql.encode("utf-8")).hexdigest():
        raise JwsError(f"member {label}: its receipt answers another query than this result's")
    if before and (fields.member_id, fields.purpose) != (
        before[0].fields.member_id,
        before[0].fields.purpose,
    ):
        raise JwsError(f"member {label}: its receipt is for another requester or purpose")
    if any(c.fields.provider_id == fields.provider_id for c in before):
        raise JwsError(f"member {label}: {fields.provider_id} answers twice in this file")
    named = {str(entry.get("member_id") or ""), label} - {"", str(entry.get("address") or "")}
    if named and named != {fields.provider_id}:
        raise JwsError(
            f"member {label}: its receipt was signed by {fields.provider_id}, not by the member "
            "the file names"
        )


def _matches(path: Path, data_format: str, table: pa.Table) -> bool:
    try:
        if data_format in TEXT_FORMATS:
            buffer = io.StringIO()
            write_text(table, data_format, buffer)
            return path.read_text(encoding="utf-8") == buffer.getvalue()
        saved = (
            pq.read_table(path)
            if data_format == "parquet"
            else pa.ipc.open_stream(path.read_bytes()).read_all()
        )
    except (OSError, UnicodeDecodeError, pa.ArrowException):
        return False
    return bool(saved.column_names == table.column_names and saved.to_pylist() == table.to_pylist())
