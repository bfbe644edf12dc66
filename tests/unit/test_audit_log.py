"""The audit log: durable hash-chained entries, signed checkpoints, and tamper detection."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from connector.audit import AuditLog
from connector.audit_chain import read_entries, verify_log
from connector.audit_entry import AuditEntry
from connector.errors import AuditUnavailable
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


def _full_disk_log(tmp_path: Path) -> tuple[Path, AuditLog, list[bool]]:
    """A log whose file is /dev/full: every write fails with ENOSPC, as on a full disk."""
    path = tmp_path / "audit.jsonl"
    path.symlink_to("/dev/full")
    log = AuditLog(path, ReceiptSigner(KEY))
    changes: list[bool] = []
    log.on_change = changes.append
    return path, log, changes


def _writable_again(path: Path) -> None:
    path.unlink()
    path.write_bytes(b"")


def test_a_full_disk_makes_the_log_unavailable_until_it_recovers(tmp_path: Path) -> None:
    path, log, changes = _full_disk_log(tmp_path)
    with pytest.raises(AuditUnavailable, match="cannot write its audit log"):
        log.append(AuditEntry("query", member_id="acme", outcome="denied"))
    assert not log.available and changes == [False]
    with pytest.raises(AuditUnavailable):
        log.check_writable("acme")
    assert not log.tick()  # still full
    _writable_again(path)
    assert log.tick() and log.available and changes == [False, True]
    log.append(AuditEntry("query", member_id="acme", outcome="answered"))
    log.close()
    entries = list(read_entries(path))
    assert [e["type"] for e in entries] == ["outage", "request", "checkpoint"]
    assert entries[0]["cause"] == "the disk is full"
    assert entries[0]["refused"] == {"acme": 2}
    assert verify_log(path, KEY.public_key()).intact


def test_an_answer_cut_by_an_outage_is_recorded_late(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, ReceiptSigner(KEY))
    entry = AuditEntry("query", member_id="acme", decision="allow")
    assert log.opened(entry) == 1
    # The disk fills while the answer streams (the open file now fails with ENOSPC): the
    # final entry waits in memory.
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, log._fd)
    os.close(full)
    entry.outcome, entry.rows, entry.bytes = "answered", 5, 321
    with pytest.raises(AuditUnavailable):
        log.append(entry)
    assert log.tick()  # the file is opened again: writable
    log.close()
    entries = list(read_entries(path))
    assert [e["type"] for e in entries] == ["opened", "outage", "request", "checkpoint"]
    assert entries[1]["late_entries"] == 1
    late = entries[2]
    assert (late["late"], late["rows"], late["bytes"], late["opened_seq"]) == (True, 5, 321, 1)
    assert verify_log(path, KEY.public_key()).intact


def test_refusals_beyond_the_burst_are_counted_in_one_entry(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, ReceiptSigner(KEY), refusal_burst=3, refusals_per_second=0.001)
    seqs = [log.append(AuditEntry("query", member_id="m", outcome="denied")) for _ in range(10)]
    assert seqs[:3] == [1, 2, 3] and seqs[3:] == [0] * 7
    assert log.throttled("m") and not log.throttled("other")
    log.append(AuditEntry("query", member_id="m", outcome="answered"))  # always recorded
    log.close()
    entries = list(read_entries(path))
    aggregate = next(e for e in entries if e["type"] == "refusals")
    assert (aggregate["member_id"], aggregate["count"]) == ("m", 7)
    assert aggregate["outcomes"] == {"denied": 7}
    assert sum(1 for e in entries if e["type"] == "request") == 4


@pytest.mark.parametrize("outcome", ["exhausted", "expired", "abandoned", "unavailable"])
def test_refusals_the_connector_caused_are_counted_but_never_hold_the_member_back(
    tmp_path: Path, outcome: str
) -> None:
    # A busy connector refuses with RESOURCE_EXHAUSTED; if those refusals held a member back,
    # load alone would lock out granted members (seen in the soak: 1,984 such refusals).
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, ReceiptSigner(KEY), refusal_burst=3, refusals_per_second=0.001)
    seqs = [log.append(AuditEntry("query", member_id="m", outcome=outcome)) for _ in range(10)]
    assert seqs[:3] == [1, 2, 3] and seqs[3:] == [0] * 7  # the log still does not flood
    assert not log.throttled("m")
    for _ in range(3):
        log.append(AuditEntry("query", member_id="m", outcome="rejected"))
    assert log.throttled("m")  # its own faults still do
    log.close()
    aggregate = next(e for e in read_entries(path) if e["type"] == "refusals")
    assert aggregate["outcomes"] == {outcome: 7, "rejected": 3}


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1 " + "x" * 20_000,  # over-long
        "SELECT '\x1b]0;title\x07'",  # control characters
        "SELECT '\u202eevil'",  # bidi override
        b"SELECT '\xff\xfe'",  # not UTF-8
    ],
)
def test_long_or_malformed_queries_are_kept_by_digest(tmp_path: Path, sql: str | bytes) -> None:
    entry = AuditEntry("query", outcome="rejected")
    entry.set_query(sql)
    raw = sql if isinstance(sql, bytes) else sql.encode()
    assert entry.query == ""
    assert entry.query_sha256 == hashlib.sha256(raw).hexdigest()
    assert entry.query_length == len(sql)
    assert 0 < len(entry.query_prefix) < 200 and entry.query_prefix.isprintable()


def test_short_clean_queries_are_kept_whole() -> None:
    entry = AuditEntry("query")
    entry.set_query("SELECT plant,\n\tcount(*) FROM part_defects GROUP BY plant")
    assert entry.query.startswith("SELECT plant") and entry.query_prefix == ""


def test_other_text_fields_are_bounded() -> None:
    entry = AuditEntry("query", reasons=("r" * 5000, "ok"), datasets=("d\x1b",), purpose="p")
    record = entry.as_record()
    assert record["reasons"][1] == "ok" and len(record["reasons"][0]) < 300
    assert "\x1b" not in record["datasets"][0] and "sha256" in record["datasets"][0]
