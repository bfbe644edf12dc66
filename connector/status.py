"""The one table between the connector's exceptions and gRPC status codes, both directions."""

from __future__ import annotations

import grpc

from connector import errors

STATUS_OF: tuple[tuple[type[errors.ConnectorError], grpc.StatusCode], ...] = (
    (errors.NotAuthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.PolicyEngineError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.QueryRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.QueryTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.QueryCancelled, grpc.StatusCode.CANCELLED),
    (errors.StoreBusy, grpc.StatusCode.UNAVAILABLE),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.StoreError, grpc.StatusCode.INTERNAL),
)

ERROR_OF: dict[grpc.StatusCode, type[errors.ConnectorError]] = {
    grpc.StatusCode.UNAUTHENTICATED: errors.NotAuthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.INVALID_ARGUMENT: errors.QueryRejected,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.QueryTimeout,
    grpc.StatusCode.CANCELLED: errors.QueryCancelled,
}


def status_of(error: errors.ConnectorError) -> grpc.StatusCode:
    """The status code a connector error is sent as (INTERNAL for anything unlisted)."""
    for kind, code in STATUS_OF:
        if isinstance(error, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_from_status(code: grpc.StatusCode, details: str) -> errors.ConnectorError:
    """The connector error a peer raises for a status received from a provider."""
    kind = ERROR_OF.get(code)
    if kind is errors.PermissionDenied:
        return errors.PermissionDenied(details.split("; ") if details else [])
    if kind is None:
        return errors.PeerError(f"{code.name}: {details}" if details else code.name)
    return kind(details)
