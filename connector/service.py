"""The gRPC servicer: converts messages, calls the Provider, maps errors to status codes.

No policy or SQL logic lives here. The member id comes from the TLS-verified certificate
in the auth context, never from a request field.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any, NoReturn

import grpc

from connector import __version__
from connector._proto.connector.v1 import connector_pb2 as pb
from connector.audit_entry import AuditEntry
from connector.errors import (
    AuditUnavailable,
    ConnectorError,
    PermissionDenied,
    PolicyEngineError,
    QueryCancelled,
    QueryRejected,
    QueryStalled,
    QueryTimeout,
    RequestAbandoned,
    RequestExpired,
    ResourceExhausted,
    ShuttingDown,
)
from connector.identity import MemberIdentity
from connector.log_context import bind_request
from connector.peer_failures import (
    STOPPING,
    EngineFailureLog,
    new_request_id,
    peer_text,
    recorded_refusal,
)
from connector.policy.ref import joined
from connector.provider import Provider
from connector.query_run import QueryRun
from connector.status import REASON_KEY, reasons_metadata, status_of
from connector.wire import (
    arrow_piece_message,
    dataset_message,
    decision_message,
    lenient,
    peer_request,
    query_response_bytes,
    receipt_message,
)

log = logging.getLogger(__name__)


def _abort(
    context: grpc.ServicerContext, error: ConnectorError, engine_log: EngineFailureLog
) -> NoReturn:
    code = status_of(error)
    if isinstance(error, PolicyEngineError):
        engine_log.failed(error)
    else:
        log.info("request refused (%s): %s", code.name, error.message)
    if isinstance(error, PermissionDenied):
        context.set_trailing_metadata(reasons_metadata(error))
    elif code is grpc.StatusCode.UNAVAILABLE:
        # A reason marks the refusal as the provider's own, not a transport failure.
        context.set_trailing_metadata(((REASON_KEY, peer_text(error).encode("utf-8")),))
    context.abort(code, peer_text(error))
    raise AssertionError("context.abort returns only by raising")  # pragma: no cover


def _internal(context: grpc.ServicerContext, method: str) -> NoReturn:
    # A bug must not take the server down nor leak internals: log it, answer INTERNAL.
    log.exception("%s failed unexpectedly", method)
    context.abort(
        grpc.StatusCode.INTERNAL,
        "the provider's connector failed unexpectedly; its operators can find the cause in its log",
    )
    raise AssertionError("context.abort returns only by raising")  # pragma: no cover


class _Handed:
    """What was handed to the transport so far: rows, bytes and their sha256."""

    def __init__(self, run: QueryRun) -> None:
        self.rows = 0
        self.bytes = 0
        self._run = run

    def add(self, piece: bytes, rows: int) -> None:
        self.rows = rows
        self.bytes += len(piece)

    def onto(self, entry: AuditEntry) -> None:
        entry.rows, entry.bytes = self.rows, self.bytes
        entry.result_sha256 = self._run.digest_of_first(self.bytes)


class ConnectorService:
    """connector.v1.Connector over a Provider; every request leaves an audit entry.

    Handlers take the request stream (see `add_to_server`), so they run even for a request
    that expired or was cancelled while it waited for a worker, and record it.
    """

    def __init__(
        self,
        provider: Provider,
        *,
        max_piece_bytes: int = 4 * 4 * 1024 * 1024,
        max_in_flight: int = 0,
    ) -> None:
        self._provider = provider
        self._max_piece_bytes = max_piece_bytes
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        self.arrivals = 0  # connector requests since start: each has its audit record
        self._engine_log = EngineFailureLog()
        self._count_lock = threading.Condition()
        self._runs: set[QueryRun] = set()
        self.stopping = False  # set once by stop_queries(): the server is shutting down

    def arrived(self) -> None:
        """A request arrived (called before it waits for a worker); no I/O."""
        with self._count_lock:
            self._in_flight += 1
            self.arrivals += 1

    def _left(self) -> None:
        bind_request(None)
        with self._count_lock:
            self._in_flight -= 1
            self._count_lock.notify_all()

    def wait_until_idle(self, timeout: float, *, queries_only: bool = False) -> bool:
        """Wait up to timeout seconds until no request (or no query) is in progress."""
        with self._count_lock:
            return self._count_lock.wait_for(
                lambda: not (self._runs if queries_only else self._in_flight), timeout
            )

    def stop_queries(self) -> int:
        """Shutting down: refuse what still arrives and stop every running query (each ends
        with UNAVAILABLE and its audit entry, outcome "shutdown"); returns how many."""
        with self._count_lock:
            self.stopping = True
            runs = list(self._runs)
        for run in runs:
            run.cancel()
        return len(runs)

    def _track(self, run: QueryRun, running: bool) -> None:
        with self._count_lock:
            if running:
                self._runs.add(run)
            else:
                self._runs.discard(run)
            self._count_lock.notify_all()
            late = running and self.stopping  # admitted while stop_queries() ran
        if late:
            run.cancel()

    def _member(self, context: grpc.ServicerContext, entry: AuditEntry) -> MemberIdentity:
        certs = context.auth_context().get("x509_pem_cert") or [b""]
        return self._provider.authenticate(certs[0], entry)

    def _admit(self, context: grpc.ServicerContext, entry: AuditEntry) -> MemberIdentity:
        """Who asks, and whether the connector takes the request now (refused quickly)."""
        member = self._member(context, entry)
        if self.stopping:
            raise ShuttingDown("the provider's connector is shutting down; retry later")
        self._provider.audit.admit(member.member_id)
        if self._max_in_flight and self._in_flight > self._max_in_flight:
            raise ResourceExhausted(
                "this connector has its maximum number of requests in progress; retry shortly"
            )
        return member

    def _receive(self, requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        """The one request message; a request that expired or was dropped is an error."""
        try:
            request = next(requests)
        except StopIteration:
            raise QueryRejected("the call carried no request message") from None
        except grpc.RpcError:
            if context.time_remaining() is not None and context.time_remaining() <= 0:
                raise RequestExpired(
                    "the request's deadline passed before the connector could read it"
                ) from None
            raise RequestAbandoned(
                "the request was cancelled, or exceeded the message size limit, before the "
                "connector read it"
            ) from None
        if not context.is_active():
            raise RequestExpired("the request's deadline passed before a worker was free")
        return request

    def _refuse(
        self, context: grpc.ServicerContext, entry: AuditEntry, error: Exception, method: str
    ) -> NoReturn:
        error = recorded_refusal(error, entry, self._provider.record, method)
        if isinstance(error, ConnectorError):
            _abort(context, error, self._engine_log)
        _internal(context, method)

    def GetCatalog(  # noqa: N802 (gRPC method name)
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> pb.Catalog:
        """The datasets granted to the calling member."""
        entry = AuditEntry("catalog", request_id=new_request_id())
        bind_request(entry)  # log lines from here on name the request and its member
        try:
            member = self._admit(context, entry)
            self._receive(requests, context)
            datasets = self._provider.catalog(member, entry)
        except Exception as error:
            self._refuse(context, entry, error, "GetCatalog")
        finally:
            self._left()
        signer = self._provider.signer
        endorsed = signer.endorsement
        return pb.Catalog(
            provider_id=self._provider.member_id,
            member_id=member.member_id,
            datasets=[dataset_message(d) for d in datasets],
            receipt_public_key_pem=signer.public_key_pem,
            receipt_key_id=signer.key_id,
            provider_certificate_pem=endorsed.certificate_pem,
            receipt_key_endorsement=endorsed.jws,
            connector_version=__version__,
        )

    def Explain(  # noqa: N802
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> pb.Decision:
        """The decision for a query, without running it."""
        entry = AuditEntry("explain", request_id=new_request_id())
        bind_request(entry)  # log lines from here on name the request and its member
        try:
            member = self._admit(context, entry)
            request = peer_request(self._receive(requests, context), entry)
            explanation = self._provider.explain(member, request, entry)
        except Exception as error:
            self._refuse(context, entry, error, "Explain")
        finally:
            self._left()
        return decision_message(explanation)

    def Query(  # noqa: N802
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[pb.QueryResponse | bytes]:
        """Run a query: Arrow IPC pieces, then the signed receipt."""
        try:
            yield from self._query(requests, context)
        finally:
            self._left()

    def _query(
        self, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[pb.QueryResponse | bytes]:
        entry = AuditEntry("query", request_id=new_request_id())
        bind_request(entry)  # log lines from here on name the request and its member
        try:
            member = self._admit(context, entry)
            request = peer_request(self._receive(requests, context), entry)
            run = self._provider.query(member, request, entry, context.time_remaining())
        except Exception as error:
            self._refuse(context, entry, error, "Query")
        # Nothing leaves before the request is on disk: pieces() writes its entry first.
        context.add_callback(run.cancel)
        run.end_stream = context.cancel  # a peer that stops reading is cut off
        self._track(run, running=True)
        # Pieces over the message limit are refused before they count as sent.
        pieces = run.pieces(context.time_remaining(), self._max_piece_bytes)
        handed = _Handed(run)
        try:
            for piece in pieces:
                handed.add(piece, run.rows)
                yield arrow_piece_message(piece)
            # The audit entry is written (fsync) inside receipt(), before the peer gets it.
            fields, token = run.receipt()
        except GeneratorExit:
            # The peer went away while a piece was in flight: on record with what it got.
            handed.onto(entry)
            self._record_quietly(entry, self._interruption(context, run))
            raise
        except Exception as error:
            handed.onto(entry)
            if isinstance(error, QueryCancelled) and _expired(context):
                error = QueryTimeout("the query ran past the request's deadline and was stopped")
            elif isinstance(error, QueryCancelled) and self.stopping and not run.stalled:
                error = ShuttingDown(STOPPING)
            self._refuse(context, entry, error, "Query")
        finally:
            pieces.close()
            run.close()
            self._track(run, running=False)
        log.info(
            "answered %s for %s: %d rows, %d bytes, policies %s, audit entry %d",
            fields.request_id,
            member.member_id,
            fields.rows,
            fields.bytes,
            joined(fields.policies),
            fields.audit_seq,
        )
        yield pb.QueryResponse(receipt=receipt_message(fields, token))

    def _interruption(self, context: grpc.ServicerContext, run: QueryRun) -> ConnectorError:
        if run.stalled:
            return QueryStalled("the peer stopped reading the answer; the stream was ended")
        if _expired(context):
            return QueryTimeout("the request's deadline passed while the answer was sent")
        if self.stopping:
            return ShuttingDown(STOPPING)
        return QueryCancelled("the peer cancelled the query while the answer was sent")

    def _record_quietly(self, entry: AuditEntry, error: ConnectorError) -> None:
        try:
            self._provider.record(entry, error)
        except AuditUnavailable:
            log.warning("the end of request %s waits for the audit log", entry.request_id)
        except Exception:
            log.exception("could not write the audit entry of request %s", entry.request_id)


def _expired(context: grpc.ServicerContext) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def add_to_server(service: ConnectorService, server: grpc.Server) -> None:
    """Register the connector.v1.Connector methods on server.

    Every method takes the request as a stream: gRPC then always calls the handler, even
    when the request expired or was cancelled while it waited for a worker (a unary handler
    would be skipped without a trace), and a request it cannot decode reaches the handler
    as a MalformedRequest instead of an INTERNAL error without a record.
    """
    handlers = {
        "GetCatalog": grpc.stream_unary_rpc_method_handler(
            service.GetCatalog,
            request_deserializer=lenient(pb.CatalogRequest),
            response_serializer=pb.Catalog.SerializeToString,
        ),
        "Query": grpc.stream_stream_rpc_method_handler(
            service.Query,
            request_deserializer=lenient(pb.QueryRequest),
            response_serializer=query_response_bytes,
        ),
        "Explain": grpc.stream_unary_rpc_method_handler(
            service.Explain,
            request_deserializer=lenient(pb.QueryRequest),
            response_serializer=pb.Decision.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Connector"].full_name
