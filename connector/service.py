"""The gRPC servicer: converts messages, calls the Provider, maps errors to status codes.

No policy or SQL logic lives here. The member id comes from the TLS-verified certificate
in the auth context, never from a request field.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from connector._proto.connector.v1 import connector_pb2 as pb
from connector._proto.connector.v1 import connector_pb2_grpc as pb_grpc
from connector.audit import AuditEntry
from connector.errors import ConnectorError, ResourceExhausted
from connector.identity import MemberIdentity
from connector.provider import CatalogDataset, Provider
from connector.receipt import PolicyUse, ReceiptFields, policy_uses
from connector.request import Explanation, PeerRequest
from connector.sandbox import OUT_OF_MEMORY
from connector.status import status_of

log = logging.getLogger(__name__)


def _abort(context: grpc.ServicerContext, error: ConnectorError) -> NoReturn:
    code = status_of(error)
    log.info("request refused (%s): %s", code.name, error.message)
    context.abort(code, error.message)
    raise AssertionError("context.abort returns only by raising")  # pragma: no cover


def _internal(context: grpc.ServicerContext, method: str) -> NoReturn:
    # A bug must not take the server down nor leak internals: log it, answer INTERNAL.
    log.exception("%s failed unexpectedly", method)
    context.abort(
        grpc.StatusCode.INTERNAL,
        "the provider's connector failed unexpectedly; its operators can find the cause in its log",
    )
    raise AssertionError("context.abort returns only by raising")  # pragma: no cover


def _timestamp(moment: dt.datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(dt.UTC))
    return stamp


def obligations_json(obligations: Mapping[str, Any]) -> str:
    """Obligations as canonical JSON text (empty when there are none)."""
    return json.dumps(dict(obligations), sort_keys=True) if obligations else ""


def _policy_refs(uses: tuple[PolicyUse, ...]) -> list[pb.PolicyRef]:
    return [pb.PolicyRef(id=u.id, version=u.version) for u in uses]


def _dataset_message(entry: CatalogDataset) -> pb.Dataset:
    grant = entry.grant
    masks = entry.shaping.mask_of
    return pb.Dataset(
        name=entry.info.name,
        description=entry.info.description,
        columns=[
            pb.Column(name=c.name, type=c.type, masked=c.name in masks, mask=masks.get(c.name, ""))
            for c in entry.columns
        ],
        purposes=sorted(grant.purposes),
        policies=[pb.PolicyRef(id=i, version=v) for i, v in sorted(grant.policies)],
        valid_from=_timestamp(grant.valid_from),
        valid_until=_timestamp(grant.valid_until),
        max_rows_per_query=entry.limits.max_rows_per_query,
        queries_per_day=entry.limits.queries_per_day,
        rows_per_day=entry.limits.rows_per_day,
        obligations_json=obligations_json(entry.obligations),
        row_filter=entry.shaping.where_sql(),
        min_group_size=entry.shaping.min_group_size,
    )


def _decision_message(explanation: Explanation) -> pb.Decision:
    decision = explanation.decision
    return pb.Decision(
        allow=decision.allow,
        reasons=list(decision.reasons),
        policies=_policy_refs(policy_uses(decision.policies)),
        relations=[
            pb.Relation(
                dataset=r.dataset,
                columns=list(r.column_names),
                definition=r.description,
                masks=dict(r.shaping.masks),
                row_filter=r.shaping.where_sql(),
                min_group_size=r.min_group_size,
            )
            for r in explanation.relations
        ],
        datasets=list(explanation.shape.datasets),
        query_sha256=explanation.shape.sha256,
        obligations_json=obligations_json(decision.obligations),
        query=explanation.sql,
    )


def _receipt_message(fields: ReceiptFields, token: str) -> pb.Receipt:
    return pb.Receipt(
        request_id=fields.request_id,
        member_id=fields.member_id,
        provider_id=fields.provider_id,
        purpose=fields.purpose,
        query_sha256=fields.query_sha256,
        result_sha256=fields.result_sha256,
        rows=fields.rows,
        bytes=fields.bytes,
        truncated=fields.truncated,
        policies=_policy_refs(fields.policies),
        issued_at=_timestamp(dt.datetime.fromisoformat(fields.issued_at)),
        audit_seq=fields.audit_seq,
        obligations_json=obligations_json(fields.obligations),
        jws=token,
    )


def _peer_request(request: pb.QueryRequest, entry: AuditEntry) -> PeerRequest:
    entry.query, entry.purpose = request.sql, request.purpose
    entry.query_sha256 = hashlib.sha256(request.sql.encode()).hexdigest()
    checked = PeerRequest.checked(
        request.sql, request.purpose, request.max_rows, request.request_id
    )
    entry.request_id = checked.request_id
    return checked


class ConnectorService(pb_grpc.ConnectorServicer):
    """connector.v1.Connector over a Provider; every request leaves one audit entry."""

    def __init__(self, provider: Provider) -> None:
        self._provider = provider

    def _member(self, context: grpc.ServicerContext, entry: AuditEntry) -> MemberIdentity:
        certs = context.auth_context().get("x509_pem_cert") or [b""]
        return self._provider.authenticate(certs[0], entry)

    def _refuse(
        self, context: grpc.ServicerContext, entry: AuditEntry, error: Exception, method: str
    ) -> NoReturn:
        if isinstance(error, MemoryError):  # at the process's memory limit (process_memory.py)
            error = ResourceExhausted(OUT_OF_MEMORY)
        try:
            self._provider.record(entry, error)
        except Exception:
            log.exception("could not write the audit entry of a refused %s", method)
        if isinstance(error, ConnectorError):
            _abort(context, error)
        _internal(context, method)

    def GetCatalog(  # noqa: N802 (gRPC method name)
        self, request: pb.CatalogRequest, context: grpc.ServicerContext
    ) -> pb.Catalog:
        entry = AuditEntry("catalog", request_id=str(uuid.uuid4()))
        try:
            member = self._member(context, entry)
            datasets = self._provider.catalog(member, entry)
        except Exception as error:
            self._refuse(context, entry, error, "GetCatalog")
        signer = self._provider.signer
        return pb.Catalog(
            provider_id=self._provider.member_id,
            member_id=member.member_id,
            datasets=[_dataset_message(d) for d in datasets],
            receipt_public_key_pem=signer.public_key_pem,
            receipt_key_id=signer.key_id,
            provider_certificate_pem=signer.certificate_pem,
            receipt_key_endorsement=signer.endorsement,
        )

    def Explain(  # noqa: N802
        self, request: pb.QueryRequest, context: grpc.ServicerContext
    ) -> pb.Decision:
        entry = AuditEntry("explain")
        try:
            member = self._member(context, entry)
            explanation = self._provider.explain(member, _peer_request(request, entry), entry)
        except Exception as error:
            self._refuse(context, entry, error, "Explain")
        return _decision_message(explanation)

    def Query(  # noqa: N802
        self, request: pb.QueryRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.QueryResponse]:
        entry = AuditEntry("query")
        try:
            member = self._member(context, entry)
            run = self._provider.query(member, _peer_request(request, entry), entry)
        except Exception as error:
            self._refuse(context, entry, error, "Query")
        context.add_callback(run.cancel)
        pieces = run.pieces(context.time_remaining())
        try:
            for piece in pieces:
                yield pb.QueryResponse(arrow_ipc=piece)
            # The audit entry is written (fsync) inside receipt(), before the peer gets it.
            fields, token = run.receipt()
        except Exception as error:
            self._refuse(context, entry, error, "Query")
        finally:
            pieces.close()  # records a cancellation when the peer left mid-stream
            run.close()
        log.info(
            "answered %s for %s: %d rows, %d bytes, policies %s, audit entry %d",
            fields.request_id,
            member.member_id,
            fields.rows,
            fields.bytes,
            ", ".join(f"{p.id}@{p.version}" for p in fields.policies),
            fields.audit_seq,
        )
        yield pb.QueryResponse(receipt=_receipt_message(fields, token))
