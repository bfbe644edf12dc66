"""Between the connector's exceptions and gRPC: status codes and refusal reasons, both ways.

Each exception class names its status code (`errors.py`); this module turns the name into
a `grpc.StatusCode`. The reasons of a refusal travel one per trailing-metadata entry under
REASON_KEY (UTF-8), so no separator inside a reason can split or join them.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from connector import errors

REASON_KEY = "connector-reason-bin"

ERROR_OF: dict[grpc.StatusCode, type[errors.ConnectorError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.NotAuthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: errors.QueryRejected,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.QueryTimeout,
    grpc.StatusCode.CANCELLED: errors.QueryCancelled,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
}


def status_of(error: errors.ConnectorError) -> grpc.StatusCode:
    """The status code a connector error is sent as."""
    return grpc.StatusCode[error.status]


def reasons_metadata(error: errors.ConnectorError) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata carrying each reason of a refusal on its own."""
    reasons = error.reasons if isinstance(error, errors.PermissionDenied) else [error.message]
    return tuple((REASON_KEY, reason.encode("utf-8")) for reason in reasons)


def error_from_status(
    code: grpc.StatusCode, details: str, metadata: Sequence[tuple[str, str | bytes]] = ()
) -> errors.ConnectorError:
    """The connector error a peer raises for a status received from a provider."""
    reasons = [
        value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
        for key, value in metadata
        if key == REASON_KEY
    ]
    kind = ERROR_OF.get(code)
    if kind is errors.PermissionDenied:
        return errors.PermissionDenied(reasons or ([details] if details else []))
    if kind is None:
        return errors.PeerError(f"{code.name}: {details}" if details else code.name)
    return kind(details)
