"""Group commit: concurrent requests share fsyncs, yet no append returns (and so no answer
leaves) before an fsync that covers its entry; a failed fsync refuses every entry it did not
cover and leaves an intact chain."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from connector.audit import AuditLog
from connector.audit_chain import read_entries, verify_log
from connector.audit_entry import AuditEntry
from connector.errors import AuditUnavailable
from connector.receipt import ReceiptSigner

KEY = ed25519.Ed25519PrivateKey.generate()
THREADS = 8
EACH = 15


def _entry(name: str) -> AuditEntry:
    return AuditEntry("query", request_id=name, member_id="acme", outcome="answered")


def _line_ends(path: Path) -> dict[int, int]:
    """Where each entry's line ends in the file, by sequence number."""
    ends, at = {}, 0
    for line in path.read_bytes().splitlines(keepends=True):
        at += len(line)
        ends[int(json.loads(line)["seq"])] = at
    return ends


def test_appends_share_fsyncs_and_return_only_once_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, ReceiptSigner(KEY), checkpoint_every=10_000)
    synced = [0]  # the file size the last finished fsync covered
    calls = [0]
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        size = os.fstat(fd).st_size
        time.sleep(0.003)  # a disk's flush: others write meanwhile
        real_fsync(fd)
        calls[0] += 1
        synced[0] = max(synced[0], size)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    covered: dict[int, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def work(worker: int) -> None:
        start.wait()
        for i in range(EACH):
            entry = _entry(f"w{worker}-{i}")
            opened = log.opened(entry)
            with lock:
                covered[opened] = synced[0]
            seq = log.append(entry)
            with lock:
                covered[seq] = synced[0]

    threads = [threading.Thread(target=work, args=(w,)) for w in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    ends = _line_ends(path)
    assert len(covered) == 2 * THREADS * EACH
    for seq, size in covered.items():
        assert size >= ends[seq], f"entry {seq} returned before an fsync covered it"
    assert calls[0] < 2 * THREADS * EACH  # shared
    assert verify_log(path, KEY.public_key()).intact


def test_a_failed_fsync_refuses_the_entries_it_did_not_cover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, ReceiptSigner(KEY), checkpoint_every=10_000)
    log.append(_entry("before"))
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "fsync", failing)
    entry = _entry("lost")
    with pytest.raises(AuditUnavailable):
        log.opened(entry)
    assert entry.opened_seq == 0 and not log.available
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert log.tick()  # the log recovers, with an outage entry counting the refusal
    log.close()
    records = list(read_entries(path))
    assert [r.get("request_id") for r in records if r["type"] in ("request", "opened")] == [
        "before"
    ]
    assert any(r["type"] == "outage" and r["refused"] == {"acme": 1} for r in records)
    assert verify_log(path, KEY.public_key()).intact


def test_an_entry_a_failed_checkpoint_drops_is_refused_not_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpoint written right after an entry fails (disk full) and drops the entry's
    # unsynced line: the request must be refused, not answered with a number not on disk.
    unpatched = AuditLog._put

    def full(self: AuditLog, line: bytes, sync: bool = True) -> None:
        if sync:  # only the checkpoint writes with sync
            raise OSError(errno.ENOSPC, "No space left on device")
        unpatched(self, line, sync)

    for method in ("append", "opened"):
        log = AuditLog(tmp_path / f"{method}.jsonl", ReceiptSigner(KEY), checkpoint_every=2)
        log.append(_entry("first"))
        monkeypatch.setattr(AuditLog, "_put", full)
        with pytest.raises(AuditUnavailable):
            getattr(log, method)(_entry("second"))
        monkeypatch.undo()
        assert len(list(read_entries(tmp_path / f"{method}.jsonl"))) == 1, method
        log.close()
