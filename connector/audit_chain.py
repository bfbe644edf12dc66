"""The audit log's hash chain: each entry holds the hash of the one before, and signed
checkpoints anchor it. Reading a log, recovering its tail after a crash and checking it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from connector import jws
from connector.canonical import canonical_bytes

log = logging.getLogger(__name__)

GENESIS = "0" * 64


def entry_hash(entry: Mapping[str, Any]) -> str:
    """The sha256 of an entry's canonical JSON without its own hash field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_bytes(body)).hexdigest()


def recover_tail(path: Path) -> tuple[int, str]:
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
    if entry.get("hash") != entry_hash(entry):
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
