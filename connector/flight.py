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
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pyarrow as pa
from pyarrow import flight

from connector._proto import flight_sql_pb2 as sql_pb
from connector.audit_entry import AuditEntry, bounded
from connector.errors import (
    AuditUnavailable,
    ConfigError,
    ConnectorError,
    IdentityError,
    NotAuthenticated,
    PermissionDenied,
    PolicyEngineError,
    QueryCancelled,
    QueryRejected,
    QueryStalled,
    ResourceExhausted,
    ShuttingDown,
    StateUnavailable,
    Unimplemented,
    first_line,
)
from connector.flight_answer import IpcFeed, receipt_metadata
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
    STATE_FAILED,
    STOPPING,
    EngineFailureLog,
    new_request_id,
    storage_trouble,
)
from connector.policy.ref import policy_refs
from connector.provider import Provider
from connector.query_run import QueryRun
from connector.request import PeerRequest
from connector.sandbox_errors import OUT_OF_MEMORY

log = logging.getLogger(__name__)

UNREAD_SECONDS = 1.0  # at stop, answers whose peers read nothing for this long are not awaited
# After the grace, stopped queries need a moment to notice the interrupt and record themselves.
DRAIN_SECONDS = 5.0


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
        # Answers being sent and their audit entries: whoever takes a run out of here (its
        # stream, or stop() for a peer that does not read) writes its one entry.
        self._running: dict[QueryRun, AuditEntry] = {}
        self._stopping = False
        # Answers being sent, by member. A stalled peer's query is stopped, but pyarrow keeps
        # its call (and thread) until the peer goes: counted here, not by the query slots.
        self._sending: Counter[str] = Counter()
        self._lock = threading.Lock()

    def stop(self, grace: float) -> bool:
        """Stop taking calls; let running answers go on for grace seconds, then stop their
        queries and write the audit entry of each (also of answers nobody reads). False when
        a call is still held: pyarrow cannot cancel a call, and waits for a peer that does not
        read its answer (then even at the process's exit)."""
        stopper = threading.Thread(target=self.shutdown, name="flight-stop", daemon=True)
        stopper.start()
        until = time.monotonic() + grace
        while stopper.is_alive() and time.monotonic() < until and not self._all_unread():
            stopper.join(0.1)
        self._stop_answers()
        if stopper.is_alive():
            log.warning("the Flight SQL port stopped without waiting for answers nobody reads")
        return not stopper.is_alive()

    def _stop_answers(self) -> None:
        with self._lock:
            self._stopping = True
            runs = list(self._running)
        for run in runs:
            run.cancel()
        # Streams a peer reads end now and record themselves; the others are recorded here.
        until = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < until and not self._all_unread(at_least=0.0):
            time.sleep(0.05)
        with self._lock:
            left = list(self._running.items())
            self._running.clear()
        for run, entry in left:
            entry.rows = run.rows
            self._record_quietly(entry, ShuttingDown(STOPPING))

    def _claim(self, run: QueryRun) -> bool:
        """Take run out of the running answers: True for the one caller that records it."""
        with self._lock:
            return self._running.pop(run, None) is not None

    def _all_unread(self, at_least: float = UNREAD_SECONDS) -> bool:
        """Every answer still running waits for a peer that has not read for at_least seconds
        (True also when none runs, once stopping)."""
        with self._lock:
            runs = list(self._running)
            stopping = self._stopping
        if not runs:
            return stopping
        return all(run.waiting_for_peer() > at_least for run in runs)

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
        if isinstance(error, MemoryError):
            error = ResourceExhausted(OUT_OF_MEMORY)
        trouble = None if isinstance(error, ConnectorError) else storage_trouble(error)
        if trouble is not None:
            log.error("%s refused: the connector's state volume: %s (%s)", method, trouble, error)
            error = StateUnavailable(STATE_FAILED)
        try:
            if not isinstance(error, AuditUnavailable):
                self._provider.record(entry, error)
        except AuditUnavailable as unavailable:
            error = unavailable
        except Exception:
            log.exception("could not write the audit entry of a refused Flight %s", method)
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
                prepared = self._prepared.take(command.prepared_statement_handle, member.member_id)
                plan = self._plan(member, prepared.sql, prepared.purpose, entry)
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

    def _plan(self, member: MemberIdentity, sql: str, purpose: str, entry: AuditEntry) -> Plan:
        request = self._request(sql, purpose, entry)
        snapshot = self._provider.policies.snapshot
        explanation = self._provider.check(member, request, entry)
        refs = policy_refs(explanation.decision.policies)
        return Plan(member.member_id, purpose, sql, entry.request_id, refs, snapshot)

    # The answer: DoGet redeems the ticket once and streams.

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
            self._same_policies(member, request, plan)
            self._check_sending(member.member_id)
            run = self._provider.query(member, request, entry)
        except Exception as error:
            self._refuse(entry, error, "DoGet")
        return self._answer(run, entry, member.member_id)

    def _check_sending(self, member_id: str) -> None:
        """Refuse a member whose answers still being sent fill its share of the queries."""
        most = self._provider.slots.per_member
        with self._lock:
            if self._sending[member_id] >= most:
                raise ResourceExhausted(
                    f"you already receive {most} answers at once on this port, the most one "
                    "member may; read or close them first"
                )

    def _same_policies(self, member: MemberIdentity, request: PeerRequest, plan: Plan) -> None:
        """Refuse when the policies in force no longer allow the query by the same policy
        versions as when its ticket was issued (asked only after a reload)."""
        if self._provider.policies.snapshot is plan.snapshot:
            return
        try:
            now = self._provider.check(member, request, AuditEntry("query"))
        except PermissionDenied as denied:
            raise PermissionDenied([POLICIES_CHANGED, *denied.reasons]) from None
        if policy_refs(now.decision.policies) != plan.policies:
            raise PermissionDenied([POLICIES_CHANGED])

    def _answer(self, run: QueryRun, entry: AuditEntry, member_id: str) -> flight.FlightDataStream:
        try:
            self._provider.audit.opened(entry)  # nothing leaves before this is on disk
            pieces = run.pieces()
            feed = IpcFeed(pieces)
            try:
                reader = pa.ipc.open_stream(feed)
            except pa.ArrowException:
                raise feed.error or QueryRejected("the query produced no answer") from None
        except Exception as error:
            run.close()
            self._refuse(entry, error, "DoGet")
        with self._lock:
            if self._stopping:
                run.cancel()
            self._running[run] = entry
        batches = self._batches(run, reader, feed, entry, member_id)
        return flight.GeneratorStream(reader.schema, batches)

    def _batches(
        self,
        run: QueryRun,
        reader: pa.ipc.RecordBatchStreamReader,
        feed: IpcFeed,
        entry: AuditEntry,
        member_id: str,
    ) -> Iterator[Any]:
        held: pa.RecordBatch | None = None
        with self._lock:  # counted once sending starts (a stream never started holds nothing)
            self._sending[member_id] += 1
        try:
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except pa.ArrowException:
                    raise feed.error or QueryRejected("the answer could not be read") from None
                if held is not None:
                    yield held
                held = batch
            if feed.error is not None:
                raise feed.error
            if not self._claim(run):
                raise flight_error(ShuttingDown(STOPPING))  # stop() recorded it
            fields, token = run.receipt()  # the audit entry is on disk before the receipt leaves
        except GeneratorExit:
            if self._claim(run):
                entry.rows = run.rows
                self._record_quietly(entry, self._gone(run))
            raise
        except Exception as error:
            if not self._claim(run):
                raise flight_error(ShuttingDown(STOPPING)) from None
            entry.rows = run.rows
            if self._stopping and isinstance(error, QueryCancelled) and not run.stalled:
                error = ShuttingDown(STOPPING)
            self._refuse(entry, error, "DoGet")
        finally:
            run.close()
            with self._lock:
                self._running.pop(run, None)
                self._sending[member_id] -= 1
        receipt = receipt_metadata(self._provider.signer, token)
        log.info("answered %s over Flight SQL: %d rows", fields.request_id, fields.rows)
        last = held if held is not None else pa.RecordBatch.from_pylist([], schema=reader.schema)
        yield last, pa.py_buffer(receipt)

    @staticmethod
    def _gone(run: QueryRun) -> ConnectorError:
        if run.stalled:
            return QueryStalled("the peer stopped reading the answer; its query was stopped")
        return QueryCancelled("the peer went away while the answer was sent")

    def _record_quietly(self, entry: AuditEntry, error: ConnectorError) -> None:
        try:
            self._provider.record(entry, error)
        except Exception:
            log.exception("could not write the audit entry of request %s", entry.request_id)

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
        self._plan(member, sql, purpose, entry)  # refused now, with reasons, when not allowed
        handle = self._prepared.issue(Prepared(member.member_id, purpose, sql))
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
