"""Every request leaves one audit entry, before the peer sees the end of its answer.

The crash test kills a real `connector serve` with SIGKILL in the middle of concurrent
queries, restarts it, and checks the chain and that no answered query is missing.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from connector.audit import AuditLog
from connector.audit_chain import read_entries, verify_log
from connector.audit_entry import AuditEntry
from connector.client import Peer
from connector.errors import ConnectorError, PermissionDenied, QueryRejected
from connector.identity import load_ed25519_public
from connector.receipt import ReceiptSigner
from tests.conftest import (
    Member,
    ProviderPair,
    ServerProcess,
    Space,
    run_cli,
    wait_for,
)

PURPOSE = "quality-benchmarking"


def _requests(member: Member) -> list[dict[str, Any]]:
    path = member.home / "audit" / "audit.jsonl"
    return [e for e in read_entries(path) if e["type"] == "request"]


def test_each_request_is_on_record_with_its_outcome(space: Space) -> None:
    sql = "SELECT plant, count(*) AS n FROM part_defects GROUP BY plant"
    with space.peer() as peer:
        peer.catalog()
        answered = peer.fetch(sql, PURPOSE, request_id="answered-1")
        with pytest.raises(PermissionDenied):
            peer.query("SELECT supplier_price FROM part_defects", PURPOSE)
        with pytest.raises(QueryRejected):
            peer.query("SELECT * FROM read_csv('/etc/passwd')", PURPOSE)
        peer.explain(sql, PURPOSE)
    with space.peer(space.outsider) as peer, pytest.raises(PermissionDenied):
        peer.query(sql, PURPOSE)
    entries = _requests(space.provider)
    summary = [(e["kind"], e["member_id"], e["outcome"], e["decision"]) for e in entries]
    assert summary == [
        ("catalog", "supplier-a", "answered", ""),
        ("query", "supplier-a", "answered", "allow"),
        ("query", "supplier-a", "denied", "deny"),
        ("query", "supplier-a", "rejected", ""),
        ("explain", "supplier-a", "answered", "allow"),
        ("query", "supplier-b", "denied", "deny"),
    ]
    query = entries[1]
    receipt = answered.receipt
    assert query["seq"] == receipt.audit_seq
    assert query["request_id"] == receipt.request_id
    assert query["client_reference"] == receipt.client_reference == "answered-1"
    assert query["rows"] == receipt.rows == 4
    assert query["result_sha256"] == receipt.result_sha256
    assert query["query"] == sql
    assert query["policies"] == [{"id": "quality-benchmark", "version": 1}]
    assert query["columns"]["part_defects"][0] == "plant"
    assert "column supplier_price of dataset part_defects is not allowed" in entries[2]["reasons"]
    assert "read_csv" in entries[3]["reasons"][0]


def test_audit_cli_show_verify_export(
    tmp_path: Path, space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    with space.peer() as peer:
        peer.catalog()
        peer.query("SELECT plant FROM part_defects", PURPOSE)
    with space.peer(space.outsider) as peer, pytest.raises(PermissionDenied):
        peer.query("SELECT plant FROM part_defects", PURPOSE)
    home = space.provider.home
    capsys.readouterr()
    assert run_cli("audit", "show", "--home", home, "--member", "supplier-b") == 0
    shown = capsys.readouterr().out
    assert "supplier-b" in shown and "denied" in shown and "supplier-a" not in shown
    assert (
        run_cli(
            "audit",
            "show",
            "--home",
            home,
            "--format",
            "json",
            "--dataset",
            "part_defects",
            "--since",
            "2020-01-01",
        )
        == 0
    )
    kinds = [(e["kind"], e["outcome"]) for e in json.loads(capsys.readouterr().out)]
    assert kinds == [("catalog", "answered"), ("query", "answered"), ("query", "denied")]
    assert run_cli("audit", "export", "--home", home, "--output", tmp_path / "siem.jsonl") == 0
    exported = [json.loads(line) for line in (tmp_path / "siem.jsonl").read_text().splitlines()]
    # The answered query is small: worked out whole, it was on record before any of it left,
    # with no "opened" entry (a longer answer has one: test_decision_log).
    assert [e["type"] for e in exported] == ["request", "request", "request"]
    requests = [e for e in exported if e["type"] == "request"]
    assert [(e["kind"], e["outcome"]) for e in requests] == kinds
    assert run_cli("audit", "verify", "--home", home) == 0
    assert "intact: 3 entries" in capsys.readouterr().out
    log = home / "audit" / "audit.jsonl"
    log.write_text(log.read_text().replace('"rows":200', '"rows":1'))
    assert run_cli("audit", "verify", "--home", home) == 1
    assert "line 2 (entry 2) was changed" in capsys.readouterr().out


@pytest.mark.slow
def test_sigkill_under_load_loses_no_answered_query(provider_pair: ProviderPair) -> None:
    provider, grantee = provider_pair()
    server = ServerProcess(provider.home)
    answered: list[tuple[str, int]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        with Peer(f"127.0.0.1:{server.port}", grantee.identity(), timeout=10) as peer:
            for i in range(10_000):
                if stop.is_set():
                    return
                try:
                    result = peer.fetch(
                        "SELECT plant, sum(defects) FROM part_defects GROUP BY plant",
                        PURPOSE,
                        request_id=f"w{worker}-{i}",
                    )
                except ConnectorError:
                    return  # the server is gone
                answered.append((result.receipt.request_id, result.receipt.audit_seq))

    workers = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for w in workers:
        w.start()
    wait_for(lambda: len(answered) >= 40, timeout=60)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    stop.set()
    for w in workers:
        w.join()
    server.close()

    key = load_ed25519_public(provider.home / "keys" / "receipt.key.pub")
    log = provider.home / "audit" / "audit.jsonl"
    restarted = ServerProcess(provider.home)  # recovers a torn tail, if any
    try:
        by_seq = {e["seq"]: e["request_id"] for e in _requests(provider)}
        for request_id, seq in answered:
            assert by_seq.get(seq) == request_id, f"answered query {request_id} is not on record"
        with Peer(f"127.0.0.1:{restarted.port}", grantee.identity()) as peer:
            assert peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE)["n"][0].as_py()
    finally:
        restarted.process.send_signal(signal.SIGTERM)
        assert restarted.exit_code() == 0
        restarted.close()
    verdict = verify_log(log, key)
    assert verdict.intact, verdict.message
    assert verdict.entries > len(answered)


def test_audit_show_lists_answers_opened_but_never_finished(
    make_member: Callable[[str], Member], capsys: pytest.CaptureFixture[str]
) -> None:
    member = make_member("carmaker")
    log = AuditLog(
        member.home / "audit" / "audit.jsonl", ReceiptSigner(Ed25519PrivateKey.generate())
    )
    finished = AuditEntry("query", request_id="r-done", member_id="acme", decision="allow")
    log.opened(finished)
    finished.outcome = "answered"
    log.append(finished)
    log.opened(AuditEntry("query", request_id="r-cut", member_id="acme", decision="allow"))
    log.close()
    capsys.readouterr()
    assert run_cli("audit", "show", "--home", member.home) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert "answered" in lines[0] and "opened" in lines[1]
    assert "no final entry" in lines[2]
