"""What a Flight SQL call carries besides data: the connector's call headers in, and which
Flight error a peer receives for a connector exception out.

The counterpart of status.py for the Flight SQL port. Only Flight errors may leave a
pyarrow.flight handler: any other exception sends the client the server's traceback.
"""

from __future__ import annotations

from typing import Any, NoReturn

import pyarrow as pa
from pyarrow import flight

from connector.canonical import canonical_bytes
from connector.errors import (
    ConnectorError,
    PermissionDenied,
    PolicyEngineError,
    StateUnavailable,
    Unimplemented,
)
from connector.peer_failures import ENGINE_FAILED, ENGINE_UNAVAILABLE, STATE_FAILED

# How each kind of connector error reaches a Flight client (errors.py names the kind by its
# gRPC status). Flight has no class for INVALID_ARGUMENT or RESOURCE_EXHAUSTED: those go as
# FlightServerError; the message starts with the status name either way.
FLIGHT_ERROR_OF: dict[str, type[flight.FlightError]] = {
    "UNAUTHENTICATED": flight.FlightUnauthenticatedError,
    "PERMISSION_DENIED": flight.FlightUnauthorizedError,
    "INVALID_ARGUMENT": flight.FlightServerError,
    "RESOURCE_EXHAUSTED": flight.FlightServerError,
    "DEADLINE_EXCEEDED": flight.FlightTimedOutError,
    "CANCELLED": flight.FlightCancelledError,
    "UNAVAILABLE": flight.FlightUnavailableError,
    "UNIMPLEMENTED": flight.FlightServerError,
    "INTERNAL": flight.FlightInternalError,
}
UNEXPECTED = (
    "INTERNAL: the provider's connector failed unexpectedly; its operators can find the "
    "cause in its log"
)


def flight_error(error: ConnectorError) -> flight.FlightError:
    """The Flight error a peer receives for error: status name and text, and as extra_info
    the JSON {status, outcome, reasons} (one reason per entry)."""
    text = error.message
    if isinstance(error, PolicyEngineError):
        # Engine output, decode positions or the OPA server's address stay in the owner's log.
        text = ENGINE_UNAVAILABLE if error.status == "UNAVAILABLE" else ENGINE_FAILED
    elif isinstance(error, StateUnavailable):
        text = STATE_FAILED
    reasons = error.reasons if isinstance(error, PermissionDenied) else [text]
    detail = {"status": error.status, "outcome": error.outcome, "reasons": reasons}
    kind = FLIGHT_ERROR_OF.get(error.status, flight.FlightInternalError)
    return kind(f"{error.status}: {text}", extra_info=canonical_bytes(detail))


def unimplemented(what: str) -> Unimplemented:
    """The refusal of a Flight (SQL) call this connector does not implement."""
    return Unimplemented(
        f"this connector's Flight SQL port does not implement {what}; it answers SELECT "
        "statements (CommandStatementQuery or prepared), GetSqlInfo, GetCatalogs, "
        "GetDbSchemas, GetTables and GetTableTypes"
    )


PURPOSE_HEADER = "x-connector-purpose"
UNIMPLEMENTED_KEY = "connector.unimplemented"  # GetSchema's answer says why it is empty
MIDDLEWARE = "connector"


class CallHeaders(flight.ServerMiddleware):  # type: ignore[misc]
    """The connector's call headers of one Flight call."""

    def __init__(self, headers: dict[str, list[str | bytes]]) -> None:
        first = (headers.get(PURPOSE_HEADER) or [""])[0]
        self.purpose = first.decode("utf-8", "replace") if isinstance(first, bytes) else first


class CallHeadersFactory(flight.ServerMiddlewareFactory):  # type: ignore[misc]
    """Reads the connector's headers at the start of every Flight call."""

    def start_call(self, info: Any, headers: dict[str, list[str | bytes]]) -> CallHeaders:
        """The headers of the call starting (pyarrow calls this)."""
        return CallHeaders(headers)


def purpose_of(context: flight.ServerCallContext) -> str:
    """The purpose a call's x-connector-purpose header names ("" when none)."""
    headers = context.get_middleware(MIDDLEWARE)
    return headers.purpose if isinstance(headers, CallHeaders) else ""


class RefusedCalls:
    """The Flight calls the endpoint refuses whatever they carry (a mixin before pyarrow's
    FlightServerBase, whose own versions would answer with a traceback). Each refusal is
    recorded like any other, by `refuse_call`."""

    def refuse_call(self, context: flight.ServerCallContext, error: Unimplemented) -> NoReturn:
        """Record the refused call of the member context names, and raise its Flight error."""
        raise NotImplementedError  # the endpoint records it: it holds the audit log

    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> NoReturn:
        """Refused: datasets are listed by GetTables, for the member asking."""
        self.refuse_call(context, unimplemented("ListFlights (use GetTables)"))

    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        """Not implemented: a result's schema comes with its answer. Answered with an empty
        schema whose metadata says so, since pyarrow sends the server's traceback with any
        error raised here (even a Flight error)."""
        try:
            self.refuse_call(
                context, unimplemented("GetSchema (a result's schema comes with its answer)")
            )
        except flight.FlightError as refused:
            return flight.SchemaResult(pa.schema([], metadata={UNIMPLEMENTED_KEY: str(refused)}))

    def do_put(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> NoReturn:
        """Refused: the connector is read-only for peers."""
        self.refuse_call(context, unimplemented("DoPut (the connector is read-only for peers)"))

    def do_exchange(self, context: Any, descriptor: Any, reader: Any, writer: Any) -> NoReturn:
        """Refused."""
        self.refuse_call(context, unimplemented("DoExchange"))
