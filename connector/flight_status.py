"""Between the connector's exceptions and Arrow Flight: which Flight error a peer receives.

The counterpart of status.py for the Flight SQL port. Only Flight errors may leave a
pyarrow.flight handler: any other exception sends the client the server's traceback.
"""

from __future__ import annotations

from pyarrow import flight

from connector.canonical import canonical_bytes
from connector.errors import ConnectorError, PermissionDenied, PolicyEngineError, StateUnavailable
from connector.service import ENGINE_FAILED, ENGINE_UNAVAILABLE, STATE_FAILED

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


def unimplemented(what: str) -> flight.FlightError:
    """The refusal of a Flight (SQL) call this connector does not implement."""
    return flight.FlightServerError(
        f"UNIMPLEMENTED: this connector's Flight SQL port does not implement {what}; it answers "
        "SELECT statements (CommandStatementQuery or prepared), GetSqlInfo, GetCatalogs, "
        "GetDbSchemas, GetTables and GetTableTypes"
    )
