"""What one request did, as the audit log records it: text a peer controls is size-checked.

Over-long or malformed text (controls, bidi overrides, lone surrogates) is kept as sha256,
length and a short escaped prefix instead of whole.
"""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import re
import time
from dataclasses import dataclass, field, fields
from typing import Any

from connector.policy.ref import PolicyRef
from connector.safetext import escaped

RECORDED_QUERY_CHARS = 16_384  # longer queries are recorded by hash, length and prefix
RECORDED_FIELD_CHARS = 512  # the same for every other text field (reasons, names, purpose)
PREFIX_CHARS = 48

# Controls (except tab and newline), bidi overrides and lone surrogates mark malformed text.
_MALFORMED = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def now_text() -> str:
    """The current time as the audit log records it (UTC, microseconds)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def text_digest(value: str | bytes) -> dict[str, Any]:
    """What is recorded of text too long or malformed to keep: sha256, length, prefix."""
    if isinstance(value, bytes):
        raw, text = value, value[: PREFIX_CHARS * 4].decode("utf-8", "surrogateescape")
    else:
        raw, text = value.encode("utf-8", "surrogatepass"), value
    return {
        "sha256": hashlib.sha256(raw).hexdigest(),
        "length": len(value),
        "prefix": escaped(text[:PREFIX_CHARS]),
    }


def is_recordable(text: str, limit: int = RECORDED_FIELD_CHARS) -> bool:
    """Whether text may be recorded whole: short enough and free of hidden controls."""
    return len(text) <= limit and not _MALFORMED.search(text)


def bounded(text: str, limit: int = RECORDED_FIELD_CHARS) -> str:
    """text itself when recordable, else a bracketed summary (length, sha256, prefix)."""
    if is_recordable(text, limit):
        return text
    digest = text_digest(text)
    return (
        f"[{digest['length']} characters, sha256 {digest['sha256']}, begins {digest['prefix']!r}]"
    )


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
    query_length: int = 0
    query_prefix: str = ""  # only when the query is too long or malformed to keep whole
    client_reference: str = ""
    opened_seq: int = 0  # the "opened" entry written before the first byte of the answer
    # dataset -> [since_version, version] of the data read (as in the receipt; kept only
    # when the request got as far as a decision that reads data)
    versions: dict[str, list[int]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    seq: int = 0

    def set_query(self, sql: str | builtins.bytes) -> None:
        """Record the peer's query whole if it is short and clean, else by digest."""
        digest = text_digest(sql)
        self.query_sha256, self.query_length = digest["sha256"], digest["length"]
        if isinstance(sql, str) and is_recordable(sql, RECORDED_QUERY_CHARS):
            self.query, self.query_prefix = sql, ""
        else:
            self.query, self.query_prefix = "", digest["prefix"]

    def as_record(self) -> dict[str, Any]:
        """The JSON-able fields written to the log, each text field size-checked."""
        # Field by field, not dataclasses.asdict: its deep copy was a tenth of a tiny query.
        # The record is written at once, so sharing the entry's values is safe.
        record = {name: getattr(self, name) for name in _RECORDED}
        record["policies"] = [{"id": p.id, "version": p.version} for p in self.policies]
        if not self.versions:
            record.pop("versions")
        for name in ("request_id", "member_id", "purpose", "client_reference", "decision"):
            record[name] = bounded(record[name])
        record["datasets"] = [bounded(d) for d in self.datasets]
        record["reasons"] = [bounded(r) for r in self.reasons]
        record["columns"] = {
            bounded(d): [bounded(c) for c in cols] for d, cols in self.columns.items()
        }
        record["duration_ms"] = round((time.monotonic() - self.started) * 1000, 3)
        return record

    def opened_record(self) -> dict[str, Any]:
        """The "opened" entry: who asked what and the decision, before anything is sent."""
        full = self.as_record()
        keep = ("kind", "request_id", "member_id", "purpose", "query_sha256", "datasets")
        return {
            **{k: full[k] for k in keep},
            "decision": full["decision"],
            "policies": full["policies"],
        }


_RECORDED = tuple(f.name for f in fields(AuditEntry) if f.name not in ("started", "seq"))
