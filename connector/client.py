"""The peer side: ask another member's connector for its catalog, a decision, or a query result.

    from connector.client import Peer, PeerIdentity, receipt_of
    with Peer("127.0.0.1:50051", PeerIdentity.from_home("homes/supplier")) as peer:
        table = peer.query("SELECT plant, sum(defects) FROM part_defects GROUP BY plant",
                           purpose="quality-benchmarking")
        df = table.to_pandas()
        print(receipt_of(table).rows, receipt_of(table).policies)

Errors come back as the connector's own exceptions (PermissionDenied, QueryRejected, ...),
never as grpc.RpcError.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import pyarrow as pa

from connector._proto.connector.v1 import connector_pb2 as pb
from connector._proto.connector.v1 import connector_pb2_grpc as pb_grpc
from connector.arrow_stream import read_ipc_pieces
from connector.config import load_settings
from connector.errors import ConnectorError, IdentityError, PeerError, PeerUnreachable, Unavailable
from connector.jws import JwsError, b64url_decode
from connector.policy.ref import PolicyRef
from connector.receipt import (
    ProviderProof,
    ReceiptBundle,
    ReceiptFields,
    provider_proof,
    verify_endorsed,
)
from connector.status import REASON_KEY, error_from_status

__all__ = [
    "RECEIPT_METADATA_KEY",
    "CatalogEntry",
    "NoiseInfo",
    "Peer",
    "PeerDecision",
    "PeerIdentity",
    "QueryResult",
    "receipt_of",
]

RECEIPT_METADATA_KEY = b"connector.receipt"


@dataclass(frozen=True)
class PeerIdentity:
    """This member's certificate, key and the data space's CA bundle, as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @classmethod
    def from_files(cls, cert: Path, key: Path, ca: Path) -> PeerIdentity:
        """Read the three PEM files."""
        try:
            return cls(cert.read_bytes(), key.read_bytes(), ca.read_bytes())
        except OSError as exc:
            raise IdentityError(f"cannot read {exc.filename}: {exc.strerror}") from None

    @classmethod
    def from_home(cls, home: Path | str) -> PeerIdentity:
        """The identity of the member whose home folder (connector.toml) is given."""
        settings = load_settings(Path(home))
        return cls.from_files(settings.cert, settings.key, settings.ca)


@dataclass(frozen=True)
class NoiseInfo:
    """Differential-privacy terms of an aggregate-only dataset, with our budget left today."""

    epsilon: float
    epsilon_per_day: float
    bounds: dict[str, tuple[float, float]]
    epsilon_remaining: float
    budget_resets_at: dt.datetime | None
    mechanisms: tuple[str, ...] = ()  # Explain: how the query would be noised

    @classmethod
    def from_message(cls, message: Any) -> NoiseInfo:
        """From a NoiseTerms message."""
        resets = message.budget_resets_at if message.HasField("budget_resets_at") else None
        return cls(
            epsilon=message.epsilon,
            epsilon_per_day=message.epsilon_per_day,
            bounds={b.column: (b.low, b.high) for b in message.bounds},
            epsilon_remaining=message.epsilon_remaining,
            budget_resets_at=resets.ToDatetime(dt.UTC) if resets is not None else None,
            mechanisms=tuple(message.mechanisms),
        )


def _noise_of(message: Any) -> NoiseInfo | None:
    return NoiseInfo.from_message(message.noise) if message.HasField("noise") else None


def _group_by_of(message: Any) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(g.columns) for g in message.group_by)


@dataclass(frozen=True)
class CatalogEntry:
    """A dataset a provider offers to this peer, with the columns and terms granted."""

    name: str
    description: str
    columns: tuple[tuple[str, str], ...]
    purposes: tuple[str, ...]
    policies: tuple[PolicyRef, ...]
    valid_from: dt.datetime
    valid_until: dt.datetime
    max_rows_per_query: int = 0
    queries_per_day: int = 0
    rows_per_day: int = 0
    max_bytes_per_query: int = 0
    bytes_per_day: int = 0
    obligations: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, str] = field(default_factory=dict)  # column -> hash | redact | null
    row_filter: str = ""
    min_group_size: int = 0  # not 0: aggregate-only
    noise: NoiseInfo | None = None  # answers carry differential-privacy noise
    group_by: tuple[tuple[str, ...], ...] = ()  # the only GROUP BY sets allowed (): any
    version: int = 0  # the dataset's version (every ingest increases it)


@dataclass(frozen=True)
class PeerRelation:
    """What a query would run on under a dataset's name, as the provider explains it."""

    dataset: str
    columns: tuple[str, ...]
    definition: str
    masks: dict[str, str] = field(default_factory=dict)
    row_filter: str = ""
    min_group_size: int = 0
    noise: NoiseInfo | None = None
    group_by: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class PeerDecision:
    """A provider's dry-run decision for a query."""

    allow: bool
    reasons: tuple[str, ...]
    policies: tuple[PolicyRef, ...]
    relations: tuple[PeerRelation, ...]
    datasets: tuple[str, ...]
    query_sha256: str
    obligations: dict[str, object]
    query: str = ""  # the SQL that would run (aggregate-only adds its HAVING)


@dataclass(frozen=True)
class QueryResult:
    """A query's rows and the provider's signed receipt for them."""

    table: pa.Table
    receipt: ReceiptFields
    bundle: ReceiptBundle
    arrow_ipc: bytes

    @property
    def receipt_jws(self) -> str:
        """The receipt as signed by the provider (compact JWS)."""
        return self.bundle.receipt_jws


def receipt_of(table: pa.Table) -> ReceiptFields:
    """The receipt that Peer.query() verified and put in the table's schema metadata."""
    token = (table.schema.metadata or {}).get(RECEIPT_METADATA_KEY)
    if token is None:
        raise PeerError("this table carries no connector receipt (it did not come from query())")
    payload = token.decode().split(".")[1]
    return ReceiptFields.from_json(b64url_decode(payload))


def _uses(refs: object) -> tuple[PolicyRef, ...]:
    return tuple(PolicyRef(r.id, r.version) for r in refs)  # type: ignore[attr-defined]


class Peer:
    """A connection to one provider's connector over mutual TLS."""

    def __init__(
        self, address: str, identity: PeerIdentity, *, timeout: float | None = 60.0
    ) -> None:
        self.address = address
        self.timeout = timeout
        credentials = grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem,
            private_key=identity.key_pem,
            certificate_chain=identity.cert_pem,
        )
        self._channel = grpc.secure_channel(
            address, credentials, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        )
        self._stub = pb_grpc.ConnectorStub(self._channel)
        self._ca_pem = identity.ca_pem
        self._provider_proof: tuple[str, str] | None = None  # endorsement, certificate
        self.provider_version = ""  # the provider's connector version (set by catalog())
        self._checked_proof: tuple[tuple[str, str], ProviderProof] | None = None

    def __enter__(self) -> Peer:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def _error(self, error: grpc.RpcError) -> ConnectorError:
        code: grpc.StatusCode = error.code()
        details: str = error.details() or ""
        metadata = error.trailing_metadata() or ()
        if code is grpc.StatusCode.UNAVAILABLE and any(k == REASON_KEY for k, _ in metadata):
            return Unavailable(details)  # refused by the provider itself, for now
        if code is grpc.StatusCode.UNAVAILABLE:
            return PeerUnreachable(
                f"{self.address} is unreachable or refused the TLS handshake (is it running, and "
                f"do both sides trust the same data-space CA?): {details}"
            )
        return error_from_status(code, details, metadata)

    def catalog(self) -> list[CatalogEntry]:
        """The datasets this provider grants to us, with columns and terms."""
        try:
            answer = self._stub.GetCatalog(pb.CatalogRequest(), timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None
        self._provider_proof = (answer.receipt_key_endorsement, answer.provider_certificate_pem)
        self.provider_version = answer.connector_version
        return [
            CatalogEntry(
                name=d.name,
                description=d.description,
                columns=tuple((c.name, c.type) for c in d.columns),
                purposes=tuple(d.purposes),
                policies=_uses(d.policies),
                valid_from=d.valid_from.ToDatetime(dt.UTC),
                valid_until=d.valid_until.ToDatetime(dt.UTC),
                max_rows_per_query=d.max_rows_per_query,
                queries_per_day=d.queries_per_day,
                rows_per_day=d.rows_per_day,
                max_bytes_per_query=d.max_bytes_per_query,
                bytes_per_day=d.bytes_per_day,
                obligations=json.loads(d.obligations_json) if d.obligations_json else {},
                masks={c.name: c.mask for c in d.columns if c.masked},
                row_filter=d.row_filter,
                min_group_size=d.min_group_size,
                noise=_noise_of(d),
                group_by=_group_by_of(d),
                version=d.version,
            )
            for d in answer.datasets
        ]

    def explain(self, sql: str, purpose: str, *, since_version: int = 0) -> PeerDecision:
        """The provider's decision for sql under purpose, without running it."""
        request = pb.QueryRequest(sql=sql, purpose=purpose, since_version=since_version)
        try:
            answer = self._stub.Explain(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None
        return PeerDecision(
            allow=answer.allow,
            reasons=tuple(answer.reasons),
            policies=_uses(answer.policies),
            relations=tuple(
                PeerRelation(
                    r.dataset,
                    tuple(r.columns),
                    r.definition,
                    dict(r.masks),
                    r.row_filter,
                    r.min_group_size,
                    _noise_of(r),
                    _group_by_of(r),
                )
                for r in answer.relations
            ),
            datasets=tuple(answer.datasets),
            query_sha256=answer.query_sha256,
            obligations=json.loads(answer.obligations_json) if answer.obligations_json else {},
            query=answer.query,
        )

    def stream(
        self,
        sql: str,
        purpose: str,
        *,
        max_rows: int = 0,
        request_id: str = "",
        since_version: int = 0,
    ) -> Iterator[pb.QueryResponse]:
        """The raw response stream: arrow_ipc pieces, then the receipt."""
        request = pb.QueryRequest(
            sql=sql,
            purpose=purpose,
            max_rows=max_rows,
            request_id=request_id,
            since_version=since_version,
        )
        try:
            yield from self._stub.Query(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None

    def query(
        self,
        sql: str,
        purpose: str,
        *,
        max_rows: int = 0,
        request_id: str = "",
        since_version: int = 0,
    ) -> pa.Table:
        """Run sql under purpose; a pyarrow.Table carrying its verified receipt (receipt_of).
        since_version: only the rows appended after that version of the dataset."""
        result = self.fetch(
            sql, purpose, max_rows=max_rows, request_id=request_id, since_version=since_version
        )
        metadata = dict(result.table.schema.metadata or {})
        metadata[RECEIPT_METADATA_KEY] = result.receipt_jws.encode()
        return result.table.replace_schema_metadata(metadata)

    def fetch(
        self,
        sql: str,
        purpose: str,
        *,
        max_rows: int = 0,
        request_id: str = "",
        since_version: int = 0,
    ) -> QueryResult:
        """Run sql under purpose; the table, the verified receipt and the bytes received."""
        pieces: list[bytes] = []
        token = ""
        messages = self.stream(
            sql, purpose, max_rows=max_rows, request_id=request_id, since_version=since_version
        )
        for message in messages:
            if message.HasField("receipt"):
                token = message.receipt.jws
            else:
                pieces.append(message.arrow_ipc)
        if not token:
            raise PeerError(f"{self.address} ended the result without a receipt; do not trust it")
        data = b"".join(pieces)
        bundle = ReceiptBundle(token, *(self._provider_proof or self._fetch_provider_proof()))
        try:
            receipt = verify_endorsed(token, self._proof_of(bundle), data)
        except (JwsError, ConnectorError) as exc:
            raise PeerError(f"the receipt from {self.address} does not verify: {exc}") from None
        return QueryResult(read_ipc_pieces([data]), receipt, bundle, data)

    def provider_proof(self) -> tuple[str, str]:
        """The provider's receipt-key endorsement and certificate (from its catalog)."""
        return self._provider_proof or self._fetch_provider_proof()

    def _proof_of(self, bundle: ReceiptBundle) -> ProviderProof:
        """The provider's receipt key, checked once per certificate and endorsement (both
        come from its catalog; a new pair, e.g. after a certificate rotation, is checked)."""
        pair = (bundle.endorsement, bundle.provider_certificate_pem)
        known = self._checked_proof
        if known is not None and known[0] == pair:
            return known[1]
        proof = provider_proof(bundle, self._ca_pem)
        self._checked_proof = (pair, proof)
        return proof

    def _fetch_provider_proof(self) -> tuple[str, str]:
        """The provider's certificate and receipt-key endorsement, as its catalog gives them."""
        self.catalog()
        if self._provider_proof is None:
            raise PeerError(f"{self.address} gave no certificate to check receipts against")
        return self._provider_proof
