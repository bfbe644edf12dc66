"""What a peer is told when the connector, not the peer, is at fault: fixed texts instead of
internals (engine output, JSON decode positions, the OPA server's address), the same on
every wire; the owner's log and the audit entry keep the detail."""

from __future__ import annotations

import errno
import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable

from connector.audit_entry import AuditEntry
from connector.audit_outage import write_failure_cause
from connector.errors import (
    AuditUnavailable,
    ConnectorError,
    PolicyEngineError,
    PolicyEngineUnavailable,
    ResourceExhausted,
    StateUnavailable,
)
from connector.rate import RateLimit
from connector.sandbox_errors import OUT_OF_MEMORY

log = logging.getLogger(__name__)

# What a peer is told instead of an error text that would show the provider's internals
# (engine output, JSON decode positions, the OPA server's address); the owner's log and the
# audit entry keep the detail.
ENGINE_FAILED = (
    "the provider's policy engine could not reach a decision, so nothing is answered; the "
    "provider's operators can see why in its log"
)
ENGINE_UNAVAILABLE = (
    "the provider's policy engine is unavailable right now, so nothing is answered; retry "
    "later (the provider's operators can see why in its log)"
)
STOPPING = (
    "the provider's connector is shutting down, so this query was stopped before it ended; "
    "retry later"
)
STATE_FAILED = (
    "the provider's connector cannot write its working state right now, so it answers "
    "nothing; retry later"
)
_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_STORAGE_TEXTS = ("disk is full", "no space left", "readonly database", "read-only file system")


def storage_trouble(error: BaseException) -> str | None:
    """What is wrong with storage when error means a full or read-only volume, else None."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        return write_failure_cause(error)
    text = str(error).lower()
    return next((t for t in _STORAGE_TEXTS if t in text), None)


def recorded_refusal(
    error: Exception,
    entry: AuditEntry,
    record: Callable[[AuditEntry, BaseException], object],
    method: str,
) -> Exception:
    """The refusal a request ends with, on record: the process's memory limit and a full or
    read-only state volume become the connector errors that say so, and the entry is written
    (unless the audit log itself is what failed). Either wire sends what this returns."""
    if isinstance(error, MemoryError):  # at the process's memory limit (process_memory.py)
        error = ResourceExhausted(OUT_OF_MEMORY)
    trouble = None if isinstance(error, ConnectorError) else storage_trouble(error)
    if trouble is not None:
        # A full or read-only state volume: the owner is told exactly that.
        log.error("%s refused: the connector's state volume: %s (%s)", method, trouble, error)
        error = StateUnavailable(STATE_FAILED)
    try:
        if not isinstance(error, AuditUnavailable):  # else already counted or kept
            record(entry, error)
    except AuditUnavailable as unavailable:
        error = unavailable
    except Exception:
        log.exception("could not write the audit entry of a refused %s", method)
    return error


def peer_text(error: ConnectorError) -> str:
    """The message a peer gets for error (engine failures as the fixed texts above)."""
    if isinstance(error, PolicyEngineUnavailable):
        return ENGINE_UNAVAILABLE
    return ENGINE_FAILED if isinstance(error, PolicyEngineError) else error.message


class EngineFailureLog:
    """While the engine is down every request fails the same way: one ERROR line every few
    seconds per kind of failure, not one per request (a peer's retries must not flood the
    log; each request is still in the audit log)."""

    def __init__(self, per_minute: int = 6) -> None:
        self._limit = RateLimit(per_minute)
        self._unlogged: Counter[str] = Counter()
        self._lock = threading.Lock()

    def failed(self, error: PolicyEngineError) -> None:
        """Log error unless its kind was logged a moment ago (then count it)."""
        kind = type(error).__name__
        with self._lock:
            if self._limit.take(kind):
                self._unlogged[kind] += 1
                return
            also = self._unlogged.pop(kind, 0)
        log.error(
            "the policy engine failed (the peer is told only that): %s%s",
            error.message,
            f" ({also} more such refusals since the last line)" if also else "",
        )


def new_request_id() -> str:
    """A request id assigned by this connector (random, so unique across restarts too)."""
    return str(uuid.uuid4())
