"""The Arrow Flight SQL endpoint: a second transport over the same Provider.

Served by pyarrow.flight with mutual TLS against the data space's CA. It converts Flight SQL
requests to the Provider's calls and their results back, nothing more: the member comes
from the verified certificate (`peer_identity`, the SPIFFE id), the purpose from the call
header `x-connector-purpose`, and every decision, limit and audit entry is the Provider's.
Only Flight errors are raised to pyarrow: any other exception would send the client the
server's traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pyarrow as pa
from pyarrow import flight

from connector._proto import flight_sql_pb2 as sql_pb
from connector.audit_entry import AuditEntry, bounded
from connector.decided import Decided
from connector.errors import (
    ConfigError,
    ConnectorError,
    IdentityError,
    NotAuthenticated,
    PermissionDenied,
    PolicyEngineError,
    QueryRejected,
    Unimplemented,
    first_line,
)
from connector.flight_sql import (
    CLOSE_PREPARED,
    CLOSE_SESSION,
    CREATE_PREPARED,
    ListedTable,
    UnsupportedCommand,
    checked_metadata,
    metadata_table,
    only,
    pack,
    unpack,
)
from connector.flight_status import (
    MIDDLEWARE,
    PURPOSE_HEADER,
    UNEXPECTED,
    CallHeadersFactory,
    RefusedCalls,
    flight_error,
    purpose_of,
    unimplemented,
)
from connector.flight_streams import AnswerStreams
from connector.flight_tickets import (
    POLICIES_CHANGED,
    PREPARED_REFUSED,
    PREPARED_SECONDS,
    TICKET_SECONDS,
    HandleBook,
    Plan,
    Prepared,
)
from connector.identity import MemberIdentity
from connector.peer_failures import (
    EngineFailureLog,
    new_request_id,
    recorded_refusal,
)
from connector.policy.ref import policy_refs
from connector.provider import Provider
from connector.request import PeerRequest

log = logging.getLogger(__name__)


class FlightEndpoint(RefusedCalls, flight.FlightServerBase):  # type: ignore[misc]
    """Arrow Flight SQL over a Provider: serving from construction until `stop()`."""

    def __init__(self, provider: Provider, location: str, cert: Path, key: Path, ca: Path) -> None:
        try:
            pems = [path.read_bytes() for path in (cert, key, ca)]
        except OSError as exc:
            raise IdentityError(f"cannot read the TLS files for Flight SQL: {exc}") from None
        super().__init__(
            location,
            tls_certificates=[flight.CertKeyPair(cert=pems[0], key=pems[1])],
            verify_client=True,
            root_certificates=pems[2],
            middleware={MIDDLEWARE: CallHeadersFactory()},
        )
        self._provider = provider
        self._tickets: HandleBook[Plan] = HandleBook(TICKET_SECONDS, single_use=True)
        self._prepared: HandleBook[Prepared] = HandleBook(
            PREPARED_SECONDS, single_use=False, refusal=PREPARED_REFUSED
        )
        self._engine_log = EngineFailureLog()
        self._answers = AnswerStreams(provider, self._refuse)

    def stop(self, grace: float) -> bool:
        """Stop taking calls; let running answers go on for grace seconds, then stop their
        queries and write the audit entry of each (also of answers nobody reads). False when
        a call is still held: pyarrow cannot cancel a call, and waits for a peer that does not
        read its answer (then even at the process's exit)."""
        stopper = threading.Thread(target=self.shutdown, name="flight-stop", daemon=True)
        stopper.start()
        until = time.monotonic() + grace
        while stopper.is_alive() and time.monotonic() < until and not self._answers.all_unread():
            stopper.join(0.1)
        self._answers.stop_all()
        if stopper.is_alive():
            log.warning("the Flight SQL port stopped without waiting for answers nobody reads")
        return not stopper.is_alive()

    # Who asks, and for what.

    def _member(self, context: flight.ServerCallContext, entry: AuditEntry) -> MemberIdentity:
        identity = context.peer_identity()
        uri = identity.decode("utf-8", "replace") if isinstance(identity, bytes) else identity
        if not uri:
            raise NotAuthenticated("no verified client certificate was presented")
        member = self._provider.authenticate_spiffe_id(uri, entry)
        self._provider.audit.admit(member.member_id)
        return member

    @staticmethod
    def _request(sql: str, purpose: str, entry: AuditEntry) -> PeerRequest:
        entry.set_query(sql)
        entry.purpose = bounded(purpose)
        if not purpose:
            raise QueryRejected(
                f"no purpose was sent: set the call header {PURPOSE_HEADER} to the purpose your "
                "catalog lists for the dataset (ADBC: adbc.flight.sql.rpc.call_header."
                f"{PURPOSE_HEADER})"
            )
        checked = PeerRequest.checked(sql, purpose, 0, "")
        return dataclasses.replace(checked, request_id=entry.request_id)

    # Refusals: recorded by the Provider, sent as Flight errors.

    def refuse_call(self, context: flight.ServerCallContext, error: Unimplemented) -> NoReturn:
        """Record a call the port does not implement (a probe is on record like a query)."""
        entry = AuditEntry("call", request_id=new_request_id())
        try:
            self._member(context, entry)
        except Exception as refused:
            self._refuse(entry, refused, "call")
        self._refuse(entry, error, "call")

    def _refuse(self, entry: AuditEntry, error: Exception, method: str) -> NoReturn:
        if isinstance(error, flight.FlightError):
            raise error
        if isinstance(error, UnsupportedCommand):
            error = unimplemented(f"the command {error.name}")
        error = recorded_refusal(error, entry, self._provider.record, f"Flight {method}")
        if not isinstance(error, ConnectorError):
            log.exception("Flight %s failed unexpectedly", method, exc_info=error)
            raise flight.FlightInternalError(UNEXPECTED) from None
        if isinstance(error, PolicyEngineError):
            self._engine_log.failed(error)
        else:
            log.info("Flight %s refused (%s): %s", method, error.status, error.message)
        raise flight_error(error) from None

    # The control step: GetFlightInfo decides and issues a ticket.

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        """A ticket for a query (decided now) or a metadata call; refusals are recorded."""
        entry = AuditEntry("query", request_id=new_request_id())
        try:
            member = self._member(context, entry)
            if descriptor.descriptor_type != flight.DescriptorType.CMD:
                raise unimplemented("path descriptors")
            command = unpack(descriptor.command)
            purpose = purpose_of(context)
            self._tickets.check_room(member.member_id)  # before the decision is paid for
            if isinstance(command, sql_pb.CommandStatementQuery):
                plan = self._plan(member, command.query, purpose, entry)
            elif isinstance(command, sql_pb.CommandPreparedStatementQuery):
                prepared_handle = command.prepared_statement_handle
                prepared = self._prepared.take(prepared_handle, member.member_id)
                plan = self._plan(member, prepared.sql, prepared.purpose, entry, prepared.decided)
                if plan.decided is not prepared.decided:  # decided again: the next runs reuse it
                    self._prepared.update(
                        prepared_handle, dataclasses.replace(prepared, decided=plan.decided)
                    )
            else:
                metadata = checked_metadata(descriptor.command)
                plan = Plan(member.member_id, purpose, "", entry.request_id, metadata=metadata)
            handle = self._tickets.issue(plan)
        except Exception as error:
            self._refuse(entry, error, "GetFlightInfo")
        ticket = flight.Ticket(pack(sql_pb.TicketStatementQuery(statement_handle=handle)))
        endpoint = flight.FlightEndpoint(ticket, [])
        # No schema: a query's is known only once it runs (clients take the stream's).
        return flight.FlightInfo(None, descriptor, [endpoint], -1, -1)

    def _plan(
        self,
        member: MemberIdentity,
        sql: str,
        purpose: str,
        entry: AuditEntry,
        earlier: Decided | None = None,
    ) -> Plan:
        """The query decided now (or earlier's decision, while nothing it rests on changed)."""
        request = self._request(sql, purpose, entry)
        decided = self._provider.checked(member, request, entry, earlier)
        return Plan(member.member_id, purpose, sql, entry.request_id, decided)

    # The answer: DoGet redeems the ticket once; AnswerStreams streams it.

    def do_get(
        self, context: flight.ServerCallContext, ticket: flight.Ticket
    ) -> flight.FlightDataStream:
        """The answer a ticket stands for; the last message's app_metadata is the receipt."""
        entry = AuditEntry("query", request_id=new_request_id())
        try:
            member = self._member(context, entry)
            handle = unpack(ticket.ticket, only(sql_pb.TicketStatementQuery))
            plan = self._tickets.take(handle.statement_handle, member.member_id)  # type: ignore[attr-defined]
            entry.request_id = plan.request_id
            if plan.metadata:
                entry.kind = "catalog"
                return flight.RecordBatchStream(self._metadata(member, plan, entry))
            request = self._request(plan.sql, plan.purpose, entry)
            decided = self._same_policies(member, request, plan)
            self._answers.check_sending(member.member_id)
            run = self._provider.query(member, request, entry, decided=decided)
        except Exception as error:
            self._refuse(entry, error, "DoGet")
        return self._answers.stream(run, entry, member.member_id)

    def _same_policies(
        self, member: MemberIdentity, request: PeerRequest, plan: Plan
    ) -> Decided | None:
        """The decision to run the ticket's query on: the ticket's own while the policies are
        the ones it was decided under (Provider.query decides again if anything else changed);
        after a reload, the query decided again, refused unless the same policy versions
        allow it."""
        if plan.decided is None or self._provider.policies.snapshot is plan.decided.snapshot:
            return plan.decided
        try:
            # Its own entry: the request's is filled in by query(), as for any decision.
            now = self._provider.checked(member, request, AuditEntry("query"))
        except PermissionDenied as denied:
            raise PermissionDenied([POLICIES_CHANGED, *denied.reasons]) from None
        if policy_refs(now.explanation.decision.policies) != plan.policies:
            raise PermissionDenied([POLICIES_CHANGED])
        return now

    def _metadata(self, member: MemberIdentity, plan: Plan, entry: AuditEntry) -> pa.Table:
        def listed() -> list[ListedTable]:
            catalog = self._provider.catalog(member, entry)  # recorded as a catalog request
            wanted = [d for d in catalog if not plan.purpose or plan.purpose in d.grant.purposes]
            return [ListedTable(d.info.name, d.columns) for d in wanted]

        return metadata_table(unpack(plan.metadata), listed)

    # Actions: prepared statements (what ADBC and JDBC send for a plain execute).

    def do_action(
        self, context: flight.ServerCallContext, action: flight.Action
    ) -> Iterator[bytes]:
        """CreatePreparedStatement (decided now), ClosePreparedStatement, CloseSession."""
        entry = AuditEntry("query", request_id=new_request_id())
        try:
            member = self._member(context, entry)
            body = action.body.to_pybytes() if action.body is not None else b""
            if action.type == CREATE_PREPARED:
                request = unpack(body, only(sql_pb.ActionCreatePreparedStatementRequest))
                return iter([self._prepare(member, request.query, purpose_of(context), entry)])  # type: ignore[attr-defined]
            if action.type == CLOSE_PREPARED:
                request = unpack(body, only(sql_pb.ActionClosePreparedStatementRequest))
                self._prepared.close(request.prepared_statement_handle, member.member_id)  # type: ignore[attr-defined]
                return iter([])
            if action.type == CLOSE_SESSION:
                return iter([])  # no session state beyond tickets, which expire by themselves
            raise unimplemented(f"the action {bounded(action.type, 80)!r}")
        except Exception as error:
            self._refuse(entry, error, "DoAction")

    def _prepare(self, member: MemberIdentity, sql: str, purpose: str, entry: AuditEntry) -> bytes:
        self._prepared.check_room(member.member_id)
        plan = self._plan(member, sql, purpose, entry)  # refused now, with reasons, if not allowed
        handle = self._prepared.issue(Prepared(member.member_id, purpose, sql, plan.decided))
        result = sql_pb.ActionCreatePreparedStatementResult(prepared_statement_handle=handle)
        return pack(result)

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        """The actions this endpoint answers."""
        return [
            (CREATE_PREPARED, "check a SELECT for the purpose in x-connector-purpose"),
            (CLOSE_PREPARED, "forget a prepared statement"),
            (CLOSE_SESSION, "end the session (nothing to release)"),
        ]


def start_flight(
    provider: Provider, listen: str, cert: Path, key: Path, ca: Path
) -> FlightEndpoint:
    """Serve Flight SQL on listen (HOST:PORT; port 0 picks one) with mutual TLS."""
    host, _, port = listen.rpartition(":")
    location = f"grpc+tls://{host}:{port}"
    try:
        endpoint = FlightEndpoint(provider, location, cert, key, ca)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(
            f"cannot serve Flight SQL on {listen}: {first_line(exc)}; is another "
            "server using it? ([flight] listen in connector.toml)"
        ) from None
    log.info(
        "member %s: Arrow Flight SQL on grpc+tls://%s:%d (port %d), mutual TLS",
        provider.member_id,
        host,
        endpoint.port,
        endpoint.port,
    )
    return endpoint
