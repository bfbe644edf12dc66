"""The audit log: durable hash-chained entries, signed checkpoints, and tamper detection."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from connector.audit import AuditEntry, AuditLog, read_entries, verify_log
from connector.receipt import ReceiptSigner

KEY = ed25519.Ed25519PrivateKey.generate()


def _log(tmp_path: Path, entries: int = 5, every: int = 3) -> Path:
    path = tmp_path / "audit" / "audit.jsonl"
    log = AuditLog(path, ReceiptSigner(KEY), checkpoint_every=every)
    for i in range(entries):
        log.append(AuditEntry("query", request_id=f"r{i}", member_id="acme", outcome="answered"))
    log.close()
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def test_intact_log_verifies_with_checkpoints(tmp_path: Path) -> None:
    path = _log(tmp_path)
    verdict = verify_log(path, KEY.public_key())
    assert verdict.intact, verdict.message
    # 5 requests, a checkpoint after the 3rd, and one at close
    assert (verdict.entries, verdict.checkpoints, verdict.unanchored) == (7, 2, 0)
    kinds = [e["type"] for e in read_entries(path)]
    assert kinds == ["request"] * 3 + ["checkpoint"] + ["request"] * 2 + ["checkpoint"]


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = _log(tmp_path, entries=2)
    log = AuditLog(path, ReceiptSigner(KEY))
    assert log.append(AuditEntry("catalog", member_id="bob", outcome="answered")) == 4
    log.close()
    assert verify_log(path, KEY.public_key()).intact


def _tamper(path: Path, how: str) -> None:
    lines = _lines(path)
    if how == "changed":
        entry = json.loads(lines[1])
        entry["rows"] = 10**6
        lines[1] = json.dumps(entry) + "\n"
    elif how == "removed":
        del lines[1]
    elif how == "inserted":
        lines.insert(2, lines[1])
    elif how == "reordered":
        lines[1], lines[2] = lines[2], lines[1]
    path.write_text("".join(lines))


@pytest.mark.parametrize(
    ("how", "words"),
    [
        ("changed", "line 2 (entry 2) was changed"),
        ("removed", "entries 2..2 were removed before line 2"),
        ("inserted", "line 3 (entry 2) is inserted or out of order"),
        ("reordered", "entries 2..2 were removed before line 2"),
    ],
)
def test_tampering_is_found_and_named(tmp_path: Path, how: str, words: str) -> None:
    path = _log(tmp_path)
    _tamper(path, how)
    verdict = verify_log(path, KEY.public_key())
    assert not verdict.intact
    assert words in verdict.message


def test_a_rewritten_chain_fails_on_its_checkpoint_signature(tmp_path: Path) -> None:
    """Whoever rewrites entries and rehashes the chain cannot re-sign the checkpoints."""
    path = _log(tmp_path, entries=3, every=3)
    forger = ReceiptSigner(ed25519.Ed25519PrivateKey.generate())
    forged = tmp_path / "forged.jsonl"
    log = AuditLog(forged, forger, checkpoint_every=3)
    for i in range(3):
        log.append(AuditEntry("query", request_id=f"r{i}", member_id="mallory"))
    log.close()
    forged.replace(path)
    verdict = verify_log(path, KEY.public_key())
    assert not verdict.intact
    assert "not signed by this connector's key" in verdict.message


def test_garbage_line_is_reported(tmp_path: Path) -> None:
    path = _log(tmp_path)
    with path.open("a") as out:
        out.write("not json\n")
    assert "line 8 is not a JSON entry" in verify_log(path, KEY.public_key()).message


def test_torn_last_line_is_cut_off_on_open(tmp_path: Path) -> None:
    path = _log(tmp_path, entries=2)
    with path.open("a") as out:
        out.write('{"seq": 4, "type": "requ')  # a crash in the middle of a write
    log = AuditLog(path, ReceiptSigner(KEY))
    assert log.append(AuditEntry("query", outcome="answered")) == 4
    log.close()
    assert verify_log(path, KEY.public_key()).intact


def test_concurrent_appends_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, ReceiptSigner(KEY), checkpoint_every=10)
    seqs: list[int] = []

    def write(worker: int) -> None:
        for i in range(25):
            entry = AuditEntry("query", request_id=f"{worker}-{i}", outcome="answered")
            seqs.append(log.append(entry))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert len(set(seqs)) == 100
    verdict = verify_log(path, KEY.public_key())
    assert verdict.intact and verdict.checkpoints == 10


def test_an_entry_is_written_once(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "a.jsonl", ReceiptSigner(KEY))
    entry = AuditEntry("query")
    assert log.append(entry) == log.append(entry) == 1
    log.close()
