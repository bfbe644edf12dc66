"""The audit log as OPA decision-log events, so OPA's log tooling can read it.

One event per decision the audit log records, in OPA's shape (decision_id, path, input,
result, timestamp, labels, revision and bundles, requested_by), plus a `connector_audit`
field naming the entry it came from (OPA's tools ignore fields they do not know):

- a request entry (query, explain, catalog) is one event;
- an "opened" entry (written before an answer's first byte) is folded into its request
  entry's event; one without a request entry (the server stopped mid-answer) is an event;
- a "refusals" entry counts a member's throttled refusals that were not written one by
  one: they cannot become single decisions, so it is one event with `result.allow` false,
  `result.count` the number of refusals and `result.outcomes` their kinds;
- an "outage" entry is one event likewise, `result.refused` the refusals by member;
- checkpoints are not decisions: they are counted in the summary, not exported.

decision_id is a UUID made from the entry's chain hash: the same entry always gets the same
id, and no two entries share one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connector import __version__
from connector.audit_chain import read_entries, verify_log
from connector.config import Settings
from connector.errors import ConfigError
from connector.identity import load_ed25519_public, public_path
from connector.policy.ref import PolicyRef

DECISION_PATH = "connector/authz/decision"
CATALOG_PATH = "connector/authz/catalog"
BUNDLE = "connector-policies"


@dataclass
class ExportCounts:
    """How many entries of each type became events, were folded or were not decisions."""

    events: int = 0
    entries: Counter[str] = field(default_factory=Counter)
    folded_opened: int = 0
    aggregated_refusals: int = 0

    def summary(self) -> str:
        """One line: what the events were made of (so nothing looks dropped)."""
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.entries.items()))
        return (
            f"{self.events} decision events from {sum(self.entries.values())} audit entries "
            f"({kinds}); {self.folded_opened} opened entries folded into their request's event; "
            f"{self.aggregated_refusals} throttled or outage refusals in aggregate events "
            "(one event per aggregate, its count in result.count / result.refused); "
            "checkpoints are not decisions"
        )


def _timestamp(entry: Mapping[str, Any]) -> str:
    """The entry's time in RFC 3339 with a Z, as OPA writes it."""
    moment = dt.datetime.fromisoformat(str(entry.get("time")))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _revision(entry: Mapping[str, Any]) -> str:
    """The policy versions the decision used, as one revision string (empty: none)."""
    refs = sorted(
        str(PolicyRef(str(p.get("id")), int(p.get("version", 0))))
        for p in entry.get("policies") or ()
        if isinstance(p, dict)
    )
    return ",".join(refs)


def _decision_id(entry: Mapping[str, Any]) -> str:
    return str(uuid.UUID(hex=str(entry.get("hash", ""))[:32]))


def _query_input(entry: Mapping[str, Any]) -> dict[str, Any]:
    query: dict[str, Any] = {"sha256": entry.get("query_sha256", "")}
    if entry.get("query"):
        query["text"] = entry["query"]
    elif entry.get("query_length"):
        # Too long or malformed to keep whole: the log holds digest, length and prefix.
        query["length"] = entry["query_length"]
        query["prefix"] = entry.get("query_prefix", "")
    return query


def _request_event(entry: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    kind = str(entry.get("kind", ""))
    decision = entry.get("decision", "")
    inputs = {
        "kind": kind,
        "member": entry.get("member_id", ""),
        "purpose": entry.get("purpose", ""),
        "datasets": list(entry.get("datasets") or ()),
        "columns": entry.get("columns") or {},
        "request_id": entry.get("request_id", ""),
        "client_reference": entry.get("client_reference", ""),
    }
    if kind != "catalog" or entry.get("query_sha256"):
        inputs["query"] = _query_input(entry)
    result = {
        # Refused before a policy was asked (no decision): not allowed either.
        "allow": decision == "allow" or (kind == "catalog" and entry.get("outcome") == "answered"),
        "decided": bool(decision),
        "reasons": list(entry.get("reasons") or ()),
        "obligations": entry.get("obligations") or {},
        "policies": list(entry.get("policies") or ()),
        "outcome": entry.get("outcome", ""),
    }
    return (CATALOG_PATH if kind == "catalog" else DECISION_PATH), inputs, result


def _refusals_event(entry: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    inputs = {"member": entry.get("member_id", ""), "first": entry.get("first", "")}
    inputs["last"] = entry.get("last", "")
    result = {
        "allow": False,
        "aggregate": True,
        "count": int(entry.get("count", 0)),
        "outcomes": entry.get("outcomes") or {},
    }
    return inputs, result


def _outage_event(entry: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    refused = entry.get("refused") or {}
    inputs = {"from": entry.get("from", ""), "until": entry.get("until", "")}
    inputs["cause"] = entry.get("cause", "")
    result = {
        "allow": False,
        "aggregate": True,
        "count": sum(int(n) for n in refused.values()),
        "refused": refused,
        "reasons": ["the audit log could not be written; every request was refused"],
    }
    return inputs, result


def decision_events(
    entries: Iterable[Mapping[str, Any]], labels: Mapping[str, str], counts: ExportCounts
) -> Iterator[dict[str, Any]]:
    """The OPA decision-log events of the audit entries, in log order; counts filled in."""
    listed = list(entries)
    finished = {e.get("request_id") for e in listed if e.get("type") == "request"}
    for line, entry in enumerate(listed, 1):
        try:
            event = _event(entry, labels, finished, counts)
        except (ValueError, TypeError, AttributeError):
            raise ValueError(
                f"line {line} (entry {entry.get('seq')}) has a field of the wrong form"
            ) from None
        if event is not None:
            yield event


def _event(
    entry: Mapping[str, Any], labels: Mapping[str, str], finished: set[Any], counts: ExportCounts
) -> dict[str, Any] | None:
    kind = str(entry.get("type", ""))
    counts.entries[kind] += 1
    path, requested_by = DECISION_PATH, str(entry.get("member_id", ""))
    if kind == "request":
        path, inputs, result = _request_event(entry)
    elif kind == "opened":
        if entry.get("request_id") in finished:
            counts.folded_opened += 1
            return None
        _, inputs, result = _request_event({**entry, "outcome": "opened, no final entry"})
    elif kind == "refusals":
        inputs, result = _refusals_event(entry)
        counts.aggregated_refusals += result["count"]
    elif kind == "outage":
        inputs, result = _outage_event(entry)
        counts.aggregated_refusals += result["count"]
        requested_by = ""
    else:
        return None  # checkpoints: signatures over the chain, not decisions
    counts.events += 1
    revision = _revision(entry)
    return {
        "decision_id": _decision_id(entry),
        "path": path,
        "input": inputs,
        "result": result,
        "timestamp": _timestamp(entry),
        "labels": dict(labels),
        "revision": revision,
        "bundles": {BUNDLE: {"revision": revision}},
        "requested_by": requested_by,
        "connector_audit": {
            "type": kind,
            "seq": entry.get("seq"),
            "hash": entry.get("hash"),
            "opened_seq": entry.get("opened_seq", 0),
            "rows": entry.get("rows", 0),
            "bytes": entry.get("bytes", 0),
            "result_sha256": entry.get("result_sha256", ""),
            "duration_ms": entry.get("duration_ms", 0),
            "late": bool(entry.get("late", False)),
        },
    }


def labels_for(member_id: str, dataspace: str) -> dict[str, str]:
    """The labels OPA puts on every event: which connector decided (OPA: id, version)."""
    return {"app": "connector", "id": member_id, "dataspace": dataspace, "version": __version__}


def export_decision_log(settings: Settings, output: Path | None) -> int:
    """Write the home's audit log as OPA decision-log events (NDJSON) to output or stdout;
    the summary goes to stderr. A log whose chain does not verify is not exported."""
    path = settings.audit_log
    if path.exists():
        key = load_ed25519_public(public_path(settings.receipt_key))
        verdict = verify_log(path, key)
        if not verdict.intact:
            raise ConfigError(
                f"{path}: {verdict.message}; the log was changed or damaged, so its decisions "
                "are not exported: run `connector audit verify --home HOME` and restore the log "
                "from a backup"
            )
    counts = ExportCounts()
    labels = labels_for(settings.member_id, settings.dataspace)
    entries = read_entries(path) if path.exists() else iter(())
    try:
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(output.open("w", encoding="utf-8")) if output else sys.stdout
            for event in decision_events(entries, labels, counts):
                out.write(json.dumps(event, sort_keys=True) + "\n")
    except ValueError as error:
        raise ConfigError(f"{path}: {error}; run `connector audit verify --home HOME`") from None
    print(counts.summary(), file=sys.stderr)
    return 0
