"""The audit log: one JSON line per request, hash-chained, anchored by signed checkpoints.

Each entry holds the hash of the one before; checkpoints signed with the connector's
receipt key anchor the chain, so `verify_log` finds changed, removed, inserted or
reordered entries and names the first one. Entries are fsync'd before the peer sees the
end of its answer.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from connector import jws
from connector.canonical import canonical_bytes, canonical_json
from connector.policy.ref import PolicyRef
from connector.receipt import ReceiptSigner

log = logging.getLogger(__name__)

GENESIS = "0" * 64
CHECKPOINT_EVERY = 100


@dataclass
class AuditEntry:
    """What one request did; filled in while it is handled, appended when it ends."""

    kind: str
    request_id: str = ""
    member_id: str = ""
    purpose: str = ""
    query: str = ""
    query_sha256: str = ""
    datasets: tuple[str, ...] = ()
    columns: dict[str, list[str]] = field(default_factory=dict)
    decision: str = ""
    reasons: tuple[str, ...] = ()
    policies: tuple[PolicyRef, ...] = ()
    obligations: dict[str, Any] = field(default_factory=dict)
    rows: int = 0
    bytes: int = 0
    result_sha256: str = ""
    truncated: bool = False
    limited_by: str = ""  # the limit that cut the result (see Receipt.limited_by)
    outcome: str = ""
    started: float = field(default_factory=time.monotonic)
    seq: int = 0

    def as_record(self) -> dict[str, Any]:
        """The JSON-able fields written to the log."""
        record = asdict(self)
        record.pop("started")
        record.pop("seq")
        record["duration_ms"] = round((time.monotonic() - self.started) * 1000, 3)
        return record


def _entry_hash(entry: Mapping[str, Any]) -> str:
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_bytes(body)).hexdigest()


class AuditLog:
    """Append-only, fsync'd, hash-chained JSON Lines; thread-safe."""

    def __init__(
        self, path: Path, signer: ReceiptSigner, *, checkpoint_every: int = CHECKPOINT_EVERY
    ) -> None:
        self.path = path
        self._signer = signer
        self._every = checkpoint_every
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._head = _recover_tail(path)
        self._since_checkpoint = 0
        self._file = path.open("a", encoding="utf-8")

    @property
    def head(self) -> tuple[int, str]:
        """Sequence number and hash of the last entry."""
        return self._seq, self._head

    def append(self, entry: AuditEntry) -> int:
        """Write the entry durably (fsync) once; returns its sequence number."""
        with self._lock:
            if entry.seq:
                return entry.seq
            seq = entry.seq = self._write({"type": "request", **entry.as_record()})
            self._since_checkpoint += 1
            if self._since_checkpoint >= self._every:
                self._checkpoint()
            return seq

    def checkpoint(self) -> None:
        """Anchor the chain now: a checkpoint entry signed with the connector's key."""
        with self._lock:
            if self._since_checkpoint:
                self._checkpoint()

    def close(self) -> None:
        """Checkpoint and close the file."""
        self.checkpoint()
        with self._lock:
            self._file.close()

    def _checkpoint(self) -> None:
        claim = {"anchored_seq": self._seq, "head": self._head, "key_id": self._signer.key_id}
        token = self._signer.sign_json(claim)
        self._write({"type": "checkpoint", **claim, "jws": token})
        self._since_checkpoint = 0

    def _write(self, fields: dict[str, Any]) -> int:
        seq = self._seq + 1
        entry = {
            "seq": seq,
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
            **fields,
            "prev": self._head,
        }
        entry["hash"] = _entry_hash(entry)
        self._file.write(canonical_json(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._seq, self._head = seq, entry["hash"]
        return seq


def _recover_tail(path: Path) -> tuple[int, str]:
    """The last entry's seq and hash; a line torn by a crash mid-write is cut off."""
    if not path.exists() or path.stat().st_size == 0:
        return 0, GENESIS
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        # The torn line was never confirmed to anyone: the answer waits for the fsync.
        log.warning("audit log %s ended in a torn line (a crash mid-write); cutting it off", path)
        with path.open("r+b") as out:
            out.truncate(end)
            os.fsync(out.fileno())
        data = data[:end]
    if not data:
        return 0, GENESIS
    last = json.loads(data[data.rfind(b"\n", 0, len(data) - 1) + 1 :])
    return int(last["seq"]), str(last["hash"])


def read_entries(path: Path) -> Iterator[dict[str, Any]]:
    """The entries of an audit log in file order (unparseable lines raise ValueError)."""
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"line {number} is not a JSON entry") from None
            if not isinstance(entry, dict):
                raise ValueError(f"line {number} is not a JSON object")
            yield entry


@dataclass(frozen=True)
class AuditVerdict:
    """The result of checking a whole audit log."""

    intact: bool
    entries: int
    checkpoints: int
    message: str
    unanchored: int = 0


def verify_log(path: Path, public_key: ed25519.Ed25519PublicKey) -> AuditVerdict:
    """Check every hash link, sequence number and checkpoint signature; name the first break."""
    if not path.exists():
        return AuditVerdict(True, 0, 0, "no audit log yet (no request was answered)")
    expected_seq, head, checkpoints, since = 1, GENESIS, 0, 0
    try:
        for line, entry in enumerate(read_entries(path), 1):
            problem = _check_entry(entry, line, expected_seq, head, public_key)
            if problem:
                return AuditVerdict(False, expected_seq - 1, checkpoints, problem)
            if entry.get("type") == "checkpoint":
                checkpoints, since = checkpoints + 1, 0
            else:
                since += 1
            expected_seq, head = expected_seq + 1, entry["hash"]
    except ValueError as exc:
        return AuditVerdict(False, expected_seq - 1, checkpoints, str(exc))
    message = f"intact: {expected_seq - 1} entries, {checkpoints} signed checkpoints"
    if since:
        message += f"; the last {since} entries are not yet anchored by a checkpoint"
    return AuditVerdict(True, expected_seq - 1, checkpoints, message, since)


def _check_entry(
    entry: dict[str, Any],
    line: int,
    expected_seq: int,
    head: str,
    key: ed25519.Ed25519PublicKey,
) -> str | None:
    seq = entry.get("seq")
    if entry.get("hash") != _entry_hash(entry):
        return f"line {line} (entry {seq}) was changed: its hash does not match its content"
    if seq != expected_seq:
        if isinstance(seq, int) and seq > expected_seq:
            return f"entries {expected_seq}..{seq - 1} were removed before line {line}"
        return f"line {line} (entry {seq}) is inserted or out of order; expected {expected_seq}"
    if entry.get("prev") != head:
        return f"line {line} (entry {seq}) does not follow the entry before it (chain broken)"
    if entry.get("type") == "checkpoint":
        try:
            claim = json.loads(jws.verify(str(entry.get("jws")), key).payload)
        except (jws.JwsError, json.JSONDecodeError):
            return f"line {line}: checkpoint {seq} is not signed by this connector's key"
        if claim.get("anchored_seq") != seq - 1 or claim.get("head") != head:
            return f"line {line}: checkpoint {seq} signs another chain head"
    return None
