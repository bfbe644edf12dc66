"""The highest version of each policy ever in force, kept on disk so an old one cannot return.

A superseded version stays validly signed forever; without this memory, copying it (and its
signature) back over the new one would restore what the new one withdrew. The server records
each version when it comes into force; `connector policy verify` reads the same file.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from connector.atomic_file import write_atomically
from connector.errors import PolicyError

log = logging.getLogger(__name__)

FORMAT = 1
MAX_FILE_BYTES = 4 * 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class VersionRecord:
    """The highest version of one policy seen in force, and the digest of that file's bytes."""

    version: int
    sha256: str
    in_force_since: str = ""


@dataclass(frozen=True)
class InForce:
    """A policy version in force now: what the memory records."""

    policy_id: str
    version: int
    sha256: str


class VersionMemory:
    """The record of versions in force, in a JSON file (None: this process only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._records: dict[str, VersionRecord] | None = None

    @property
    def records(self) -> Mapping[str, VersionRecord]:
        """The remembered versions by policy id; PolicyError when the file cannot be trusted."""
        with self._lock:
            if self._records is None:
                self._records = read_records(self.path) if self.path else {}
            return dict(self._records)

    def record(self, in_force: Iterable[InForce]) -> list[InForce]:
        """Remember versions higher than those known; written to disk before returning them."""
        with self._lock:
            if self._records is None:
                self._records = read_records(self.path) if self.path else {}
            records = dict(self._records)
            risen = []
            now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
            for item in in_force:
                known = records.get(item.policy_id)
                if known is None or item.version > known.version:
                    records[item.policy_id] = VersionRecord(item.version, item.sha256, now)
                    risen.append(item)
            if risen and self.path is not None:
                _write(self.path, records)
            self._records = records
            return risen


def read_records(path: Path) -> dict[str, VersionRecord]:
    """The records in path; none when the file does not exist yet (a new home)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise _unusable(path, f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _unusable(path, f"is larger than {MAX_FILE_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _unusable(path, "is not JSON") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("policies"), dict):
        raise _unusable(path, "has no 'policies' table")
    fmt = raw.get("format")
    if type(fmt) is not int or fmt > FORMAT:
        raise _unusable(path, f"has format {fmt!r}; this connector reads format {FORMAT}")
    return {
        policy_id: _record(path, policy_id, entry) for policy_id, entry in raw["policies"].items()
    }


def _record(path: Path, policy_id: str, entry: object) -> VersionRecord:
    if not isinstance(entry, dict):
        raise _unusable(path, f"holds a bad entry for {policy_id!r}")
    version, sha256, since = (
        entry.get("version"),
        entry.get("sha256"),
        entry.get("in_force_since", ""),
    )
    if type(version) is not int or version < 1 or not isinstance(sha256, str):
        raise _unusable(path, f"holds a bad entry for {policy_id!r}")
    if not _SHA256.fullmatch(sha256) or not isinstance(since, str):
        raise _unusable(path, f"holds a bad entry for {policy_id!r}")
    return VersionRecord(version, sha256, since)


def _write(path: Path, records: Mapping[str, VersionRecord]) -> None:
    document = {
        "format": FORMAT,
        "policies": {
            policy_id: {
                "version": record.version,
                "sha256": record.sha256,
                "in_force_since": record.in_force_since,
            }
            for policy_id, record in sorted(records.items())
        },
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, (json.dumps(document, indent=1) + "\n").encode("utf-8"))
    except OSError as exc:
        raise PolicyError(
            f"cannot record the policy versions in force in {path} ({exc.strerror or exc}); "
            "no new version is put in force until it can be recorded: free space or fix the "
            "folder's permissions"
        ) from None


def _unusable(path: Path, problem: str) -> PolicyError:
    return PolicyError(
        f"the record of policy versions in force {path} {problem}; no policy is put in force "
        "without it. Restore it from a backup (deleting it forgets which old versions must be "
        "refused)"
    )
