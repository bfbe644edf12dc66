"""The audit log while its file cannot be written: why, the requests refused meanwhile, and
the final entries of opened answers kept to be written once it can be again."""

from __future__ import annotations

import errno
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from connector.audit_entry import AuditEntry, now_text

RETRY_SECONDS = 0.5  # how often an unwritable log is tried again
MAX_LATE_ENTRIES = 1000  # final entries of opened answers kept in memory during an outage

UNAVAILABLE_REASON = (
    "the provider's connector cannot write its audit log, so it answers nothing until "
    "its operators fix that; retry later"
)


def write_failure_cause(error: OSError) -> str:
    """What an OSError from writing the log means, in the owner's words."""
    causes = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EFBIG: "the file-size limit is reached",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "the file is not writable",
        errno.EPERM: "the file is not writable",
        errno.EBADF: "the file is not open for writing",
    }
    return causes.get(error.errno or 0, error.strerror or str(error))


@dataclass
class Outage:
    """What happened while the log could not be written."""

    since: str
    cause: str
    refused: Counter[str] = field(default_factory=Counter)
    late: list[dict[str, Any]] = field(default_factory=list)
    lost: int = 0
    tried: float = 0.0

    def due(self, *, force: bool) -> bool:
        """Whether to try writing again now (at most every RETRY_SECONDS unless forced)."""
        now = time.monotonic()
        if not force and now - self.tried < RETRY_SECONDS:
            return False
        self.tried = now
        return True

    def keep(self, entry: AuditEntry, record: dict[str, Any]) -> None:
        """A final entry of an opened answer is kept to be written on recovery; any other
        request is counted as refused."""
        if entry.opened_seq:
            if len(self.late) < MAX_LATE_ENTRIES:
                self.late.append(record)
            else:
                self.lost += 1
        else:
            self.refused[entry.member_id] += 1

    def record(self) -> dict[str, Any]:
        """The "outage" entry written first when the log can be written again."""
        return {
            "type": "outage",
            "from": self.since,
            "until": now_text(),
            "cause": self.cause,
            "refused": dict(sorted(self.refused.items())),
            "late_entries": len(self.late),
            "lost_entries": self.lost,
        }
