"""Which request a log line belongs to: the request id and member bound to the thread that
handles it, so that every line written meanwhile can carry them (`--log-format json`)."""

from __future__ import annotations

import threading
from typing import Protocol


class RequestLike(Protocol):
    """What a log line needs of a request (an AuditEntry has both)."""

    request_id: str
    member_id: str


_bound = threading.local()


def bind_request(request: RequestLike | None) -> None:
    """From now on, lines logged on this thread belong to request (None: to no request).

    The request is read when a line is written, so a member id learnt later shows too.
    """
    _bound.request = request


def current_request() -> tuple[str, str]:
    """The request id and member of the request bound to this thread ("" when none)."""
    request: RequestLike | None = getattr(_bound, "request", None)
    if request is None:
        return "", ""
    return request.request_id, request.member_id
