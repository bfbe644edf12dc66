"""The gRPC servicer: converts messages, calls the Provider, maps errors to status codes.

No policy or SQL logic lives here. The member id comes from the TLS-verified certificate
in the auth context, never from a request field.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from typing import NoReturn

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from connector._proto.connector.v1 import connector_pb2 as pb
from connector._proto.connector.v1 import connector_pb2_grpc as pb_grpc
from connector.audit import PolicyUse, ReceiptFields
from connector.errors import ConnectorError
from connector.identity import MemberIdentity
from connector.provider import (
    CatalogDataset,
    Explanation,
    PeerRequest,
    Provider,
    decision_policies,
    obligations_json,
)
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


def _policy_refs(uses: tuple[PolicyUse, ...]) -> list[pb.PolicyRef]:
    return [pb.PolicyRef(id=u.id, version=u.version) for u in uses]


def _dataset_message(entry: CatalogDataset) -> pb.Dataset:
    grant = entry.grant
    return pb.Dataset(
        name=entry.info.name,
        description=entry.info.description,
        columns=[pb.Column(name=c.name, type=c.type, masked=False) for c in entry.columns],
        purposes=sorted(grant.purposes),
        policies=[pb.PolicyRef(id=i, version=v) for i, v in sorted(grant.policies)],
        valid_from=_timestamp(grant.valid_from),
        valid_until=_timestamp(grant.valid_until),
    )


def _decision_message(explanation: Explanation) -> pb.Decision:
    decision = explanation.decision
    return pb.Decision(
        allow=decision.allow,
        reasons=list(decision.reasons),
        policies=_policy_refs(decision_policies(decision)),
        relations=[
            pb.Relation(dataset=r.dataset, columns=list(r.columns), definition=r.sql)
            for r in explanation.relations
        ],
        datasets=list(explanation.shape.datasets),
        query_sha256=explanation.shape.sha256,
        obligations_json=obligations_json(decision.obligations),
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
        jws=token,
    )


def _peer_request(request: pb.QueryRequest) -> PeerRequest:
    return PeerRequest.checked(request.sql, request.purpose, request.max_rows, request.request_id)


class ConnectorService(pb_grpc.ConnectorServicer):
    """connector.v1.Connector over a Provider."""

    def __init__(self, provider: Provider) -> None:
        self._provider = provider

    def _member(self, context: grpc.ServicerContext) -> MemberIdentity:
        certs = context.auth_context().get("x509_pem_cert") or [b""]
        return self._provider.authenticate(certs[0])

    def GetCatalog(  # noqa: N802 (gRPC method name)
        self, request: pb.CatalogRequest, context: grpc.ServicerContext
    ) -> pb.Catalog:
        try:
            member = self._member(context)
            datasets = self._provider.catalog(member)
        except ConnectorError as error:
            _abort(context, error)
        except Exception:
            _internal(context, "GetCatalog")
        signer = self._provider.signer
        return pb.Catalog(
            provider_id=self._provider.member_id,
            member_id=member.member_id,
            datasets=[_dataset_message(d) for d in datasets],
            receipt_public_key_pem=signer.public_key_pem,
            receipt_key_id=signer.key_id,
        )

    def Explain(  # noqa: N802
        self, request: pb.QueryRequest, context: grpc.ServicerContext
    ) -> pb.Decision:
        try:
            member = self._member(context)
            explanation = self._provider.explain(member, _peer_request(request))
        except ConnectorError as error:
            _abort(context, error)
        except Exception:
            _internal(context, "Explain")
        return _decision_message(explanation)

    def Query(  # noqa: N802
        self, request: pb.QueryRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.QueryResponse]:
        try:
            member = self._member(context)
            run = self._provider.query(member, _peer_request(request))
        except ConnectorError as error:
            _abort(context, error)
        except Exception:
            _internal(context, "Query")
        context.add_callback(run.cancel)
        try:
            for piece in run.pieces(context.time_remaining()):
                yield pb.QueryResponse(arrow_ipc=piece)
            fields, token = run.receipt()
        except ConnectorError as error:
            _abort(context, error)
        except Exception:
            _internal(context, "Query")
        finally:
            run.close()
        log.info(
            "answered %s for %s: %d rows, %d bytes, policies %s",
            fields.request_id,
            member.member_id,
            fields.rows,
            fields.bytes,
            ", ".join(f"{p.id}@{p.version}" for p in fields.policies),
        )
        yield pb.QueryResponse(receipt=_receipt_message(fields, token))
