"""`connector audit export --format opa-decision-log`: every decision a real server recorded
over mTLS, as OPA decision-log events, checked field by field against the audit log."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from connector import __version__
from connector.audit_chain import read_entries
from connector.decision_log import BUNDLE, CATALOG_PATH, DECISION_PATH
from connector.errors import ConnectorError
from tests.conftest import ProviderPair, connect, run_cli

PURPOSE = "quality-benchmarking"
DENIED = 6

# Longer than the answers held whole before they are sent: it has an "opened" entry.
LONG_ANSWER = "SELECT a.plant, b.week FROM part_defects a CROSS JOIN part_defects b"  # 40,000 rows


@pytest.fixture
def recorded(provider_pair: ProviderPair, serve: Any) -> tuple[Path, list[dict[str, Any]]]:
    """carmaker's home after answered, explained, denied and throttled requests (allowance
    of 2 refusals recorded one by one: the rest counted in a "refusals" entry)."""
    provider, grantee = provider_pair(
        settings={
            "refusal_burst = 400": "refusal_burst = 2",
            "refusals_per_minute = 30": "refusals_per_minute = 1",
        }
    )
    server = serve(provider)
    with connect(server, grantee) as peer:
        peer.catalog()
        peer.query(LONG_ANSWER, PURPOSE)
        peer.explain("SELECT defects FROM part_defects", PURPOSE)
        for _ in range(DENIED):
            with pytest.raises(ConnectorError):
                peer.query("SELECT supplier_price FROM part_defects", PURPOSE)
    server.stop(grace=1)  # writes the pending aggregate and a checkpoint
    return provider.home, list(read_entries(provider.home / "audit" / "audit.jsonl"))


def _export(home: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[list[Any], str]:
    capsys.readouterr()
    args = ("audit", "export", "--home", home, "--format", "opa-decision-log", "--output", out)
    assert run_cli(*args) == 0
    return [json.loads(line) for line in out.read_text().splitlines()], capsys.readouterr().err


def test_every_decision_is_an_opa_event(
    tmp_path: Path,
    recorded: tuple[Path, list[dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    home, entries = recorded
    events, err = _export(home, tmp_path / "decisions.jsonl", capsys)
    requests = [e for e in entries if e["type"] == "request"]
    aggregates = [e for e in entries if e["type"] == "refusals"]
    assert aggregates, "the test needs throttled refusals"
    # Nothing dropped: each request and each aggregate is one event, in log order.
    decisions = [e for e in entries if e["type"] in ("request", "refusals")]
    assert [ev["connector_audit"]["seq"] for ev in events] == [e["seq"] for e in decisions]
    by_seq = {e["seq"]: e for e in entries}
    for event in events:
        entry = by_seq[event["connector_audit"]["seq"]]
        assert event["decision_id"] == str(uuid.UUID(hex=entry["hash"][:32]))
        assert event["connector_audit"]["hash"] == entry["hash"]
        assert event["connector_audit"]["type"] == entry["type"]
        assert event["timestamp"].endswith("Z")
        moment = dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
        assert moment == dt.datetime.fromisoformat(entry["time"])
        assert event["labels"] == {
            "app": "connector",
            "id": "carmaker",
            "dataspace": "test-space",
            "version": __version__,
        }
        assert event["bundles"] == {BUNDLE: {"revision": event["revision"]}}
        assert event["requested_by"] == entry["member_id"] == "supplier-a"
    assert len({ev["decision_id"] for ev in events}) == len(events)
    for event, entry in zip(events, decisions, strict=True):
        if entry["type"] == "refusals":
            _check_aggregate(event, entry)
        else:
            _check_request(event, entry)
    # Every denied request is in the export: one by one or counted in an aggregate.
    one_by_one = sum(ev["result"].get("outcome") == "denied" for ev in events)
    counted = sum(ev["result"].get("count", 0) for ev in events)
    assert one_by_one == 2 and one_by_one + counted == DENIED
    assert len(requests) + len(aggregates) == len(events)
    assert f"{len(events)} decision events from {len(entries)} audit entries" in err
    assert f"{DENIED - 2} throttled or outage refusals in aggregate events" in err
    assert "1 opened entries folded" in err


def _check_request(event: dict[str, Any], entry: dict[str, Any]) -> None:
    kind = entry["kind"]
    assert event["path"] == (CATALOG_PATH if kind == "catalog" else DECISION_PATH)
    given = event["input"]
    assert given["kind"] == kind
    assert given["member"] == entry["member_id"]
    assert given["purpose"] == entry["purpose"]
    assert given["datasets"] == entry["datasets"]
    assert given["columns"] == entry["columns"]
    assert given["request_id"] == entry["request_id"]
    if kind != "catalog":
        assert given["query"] == {"sha256": entry["query_sha256"], "text": entry["query"]}
    result = event["result"]
    assert result["allow"] is (entry["outcome"] == "answered")
    assert result["decided"] is bool(entry["decision"])
    assert result["reasons"] == entry["reasons"]
    assert result["obligations"] == entry["obligations"]
    assert result["policies"] == entry["policies"]
    assert result["outcome"] == entry["outcome"]
    refs = ",".join(f"{p['id']}@{p['version']}" for p in entry["policies"])
    assert event["revision"] == refs
    if kind == "query" and entry["outcome"] == "answered":
        assert refs == "q@1"
        assert event["connector_audit"]["rows"] == entry["rows"] == 40_000
        assert event["connector_audit"]["opened_seq"] == entry["opened_seq"] > 0


def _check_aggregate(event: dict[str, Any], entry: dict[str, Any]) -> None:
    assert event["path"] == DECISION_PATH
    assert event["input"] == {
        "member": entry["member_id"],
        "first": entry["first"],
        "last": entry["last"],
    }
    assert event["result"] == {
        "allow": False,
        "aggregate": True,
        "count": entry["count"],
        "outcomes": entry["outcomes"],
    }
    assert event["revision"] == ""


def test_a_changed_log_is_refused_with_file_line_and_fix(
    tmp_path: Path,
    recorded: tuple[Path, list[dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    home, _ = recorded
    log = home / "audit" / "audit.jsonl"
    log.write_text(log.read_text().replace('"rows":40000', '"rows":1'))
    capsys.readouterr()
    out = tmp_path / "decisions.jsonl"
    args = ("audit", "export", "--home", home, "--format", "opa-decision-log", "--output", out)
    assert run_cli(*args) == 1
    err = capsys.readouterr().err
    assert f"{log}: line 3 (entry 3) was changed" in err
    assert "connector audit verify" in err and "Traceback" not in err
    assert not out.exists()
