"""One exception tree for the whole connector.

Each class carries what it means on the wire and on record: `status` (the name of the gRPC
status code a peer receives; `status.py` turns names into codes, so this module imports no
grpc) and `outcome` (the audit log's word for a request it ended). Every message says what
was wrong and what to do.
"""

from __future__ import annotations

from typing import ClassVar


class ConnectorError(Exception):
    """Base of every error the connector raises on purpose."""

    status: ClassVar[str] = "INTERNAL"
    outcome: ClassVar[str] = "failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(ConnectorError):
    """connector.toml or a command-line setting is missing or invalid."""


class IdentityError(ConnectorError):
    """A key, certificate or CA file is missing, unreadable or does not fit."""


class DirectoryError(ConfigError):
    """A member directory is malformed, not signed by the data space's CA, or out of date."""


class NotAuthenticated(ConnectorError):
    """The peer's certificate is trusted but names no member, or the member is revoked."""

    status = "UNAUTHENTICATED"
    outcome = "unauthenticated"


class PolicyError(ConnectorError):
    """A usage-policy file is malformed; carries the file and line where known."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)
        self.path = path
        self.line = line


class SignatureError(PolicyError):
    """A policy's detached signature is missing, malformed, unknown or does not match."""


class PolicyEngineError(ConnectorError):
    """The Rego decision library failed to build or evaluate (fails closed: deny)."""

    status = "PERMISSION_DENIED"  # fails closed; on record as failed, for the owner to fix


class PolicyEngineUnavailable(PolicyEngineError):
    """The OPA server is out of reach, answers nonsense or lost the policies: refuse every
    request until it answers again (the connector pushes the policies again by itself)."""

    status = "UNAVAILABLE"
    outcome = "unavailable"


class QueryRejected(ConnectorError):
    """The peer's SQL is malformed or uses something not allowed; carries the position."""

    status = "INVALID_ARGUMENT"
    outcome = "rejected"

    def __init__(self, message: str, *, position: int | None = None) -> None:
        text = message if position is None else f"{message} (at character {position + 1})"
        super().__init__(text)
        self.reason = message
        self.position = position


class Unimplemented(ConnectorError):
    """A call or command the connector does not implement (Flight SQL port); says what it
    answers instead."""

    status = "UNIMPLEMENTED"
    outcome = "rejected"


class PermissionDenied(ConnectorError):
    """The usage policies do not allow this request; carries the reasons."""

    status = "PERMISSION_DENIED"
    outcome = "denied"

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons) or ["no policy allows this request"]
        # Joined only for reading; the reasons travel one by one (status.REASON_KEY).
        super().__init__("; ".join(self.reasons))


class ResourceExhausted(ConnectorError):
    """A limit was reached: result size, memory, concurrent queries or quota."""

    status = "RESOURCE_EXHAUSTED"
    outcome = "exhausted"


class QueryTimeout(ConnectorError):
    """The query ran past its time limit and was interrupted."""

    status = "DEADLINE_EXCEEDED"
    outcome = "timeout"


class QueryCancelled(ConnectorError):
    """The peer cancelled the query; it was interrupted in DuckDB."""

    status = "CANCELLED"
    outcome = "cancelled"


class QueryStalled(QueryCancelled):
    """The peer stopped reading the answer for longer than allowed; the stream was ended."""

    outcome = "stalled"


class RequestExpired(QueryTimeout):
    """The request's deadline passed before the connector could read it."""

    outcome = "expired"


class RequestAbandoned(QueryCancelled):
    """The peer cancelled (or the transport refused) the request before it was read."""

    outcome = "abandoned"


class AnswerTooLarge(ResourceExhausted):
    """One piece of an answer is larger than the transport's message limit."""

    outcome = "too_large"


class Unavailable(ConnectorError):
    """The connector cannot answer for now for a reason of its own (storage): retry later."""

    status = "UNAVAILABLE"
    outcome = "unavailable"


class AuditUnavailable(Unavailable):
    """The audit log cannot be written (disk full, file-size limit, read-only): refuse all."""


class ShuttingDown(Unavailable):
    """The connector is stopping (SIGTERM/SIGINT): a query still running was stopped."""

    outcome = "shutdown"


class StateUnavailable(Unavailable):
    """The connector's state volume (quotas, scratch copies) cannot be written."""


class DataError(ConnectorError):
    """A file to ingest is missing, unreadable or in a format the connector cannot load."""


class AlreadyLoaded(DataError):
    """A file whose content was loaded into the dataset before (a watched folder loads
    each content once)."""

    def __init__(self, message: str, *, source: str = "") -> None:
        super().__init__(message)
        self.source = source  # the name of the file it was first loaded from


class StoreBusy(ConnectorError):
    """The DuckDB file is held by another process (usually a running server)."""

    status = "UNAVAILABLE"


class StoreError(ConnectorError):
    """The DuckDB file could not be read or a query failed for a reason the peer may see."""


class LoadedNotRead(StoreError):
    """An ingest committed its data, but the server could not read its datasets again yet:
    the file must not be loaded a second time."""


class BackupError(ConnectorError):
    """A backup could not be made, or an archive cannot be restored; says why."""


class PeerError(ConnectorError):
    """Client side: the remote connector could not be reached or answered unexpectedly."""


class PeerUnreachable(PeerError):
    """Client side: no connection or no TLS handshake with the remote connector."""


class WrongIdentity(PeerError):
    """Client side: a member's endpoint presented another certificate than that member's."""


class NotFederable(QueryRejected):
    """Client side: the query cannot be sent to several members and combined exactly."""


class FederationIncomplete(ConnectorError):
    """Client side: not every member answered, and every member's answer was required."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's text, for a message (its class name when it has
    no text: an empty message must not end in an IndexError)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
