"""The peer side: ask another member's connector for its catalog, a decision, or a query result.

    from connector.client import Peer, PeerIdentity
    with Peer("127.0.0.1:50051", PeerIdentity.from_home("homes/supplier")) as peer:
        result = peer.query("SELECT plant, sum(defects) FROM part_defects GROUP BY plant",
                            purpose="quality-benchmarking")
        df = result.table.to_pandas()
        print(result.receipt.rows, result.receipt.policies)

Errors come back as the connector's own exceptions (PermissionDenied, QueryRejected, ...),
never as grpc.RpcError.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc
import pyarrow as pa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from connector._proto.connector.v1 import connector_pb2 as pb
from connector._proto.connector.v1 import connector_pb2_grpc as pb_grpc
from connector.arrow_stream import read_ipc_pieces
from connector.audit import PolicyUse, ReceiptFields, verify_receipt
from connector.config import load_settings
from connector.errors import ConnectorError, IdentityError, PeerError
from connector.jws import JwsError
from connector.status import error_from_status

__all__ = ["CatalogEntry", "Peer", "PeerDecision", "PeerIdentity", "QueryResult"]


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
class CatalogEntry:
    """A dataset a provider offers to this peer, with the columns and terms granted."""

    name: str
    description: str
    columns: tuple[tuple[str, str], ...]
    purposes: tuple[str, ...]
    policies: tuple[PolicyUse, ...]
    valid_from: dt.datetime
    valid_until: dt.datetime


@dataclass(frozen=True)
class PeerDecision:
    """A provider's dry-run decision for a query."""

    allow: bool
    reasons: tuple[str, ...]
    policies: tuple[PolicyUse, ...]
    relations: tuple[tuple[str, tuple[str, ...], str], ...]
    datasets: tuple[str, ...]
    query_sha256: str
    obligations: dict[str, object]


@dataclass(frozen=True)
class QueryResult:
    """A query's rows and the provider's signed receipt for them."""

    table: pa.Table
    receipt: ReceiptFields
    receipt_jws: str
    arrow_ipc: bytes

    def to_pandas(self) -> object:
        """The rows as a pandas DataFrame (needs pandas installed)."""
        return self.table.to_pandas()


def _uses(refs: object) -> tuple[PolicyUse, ...]:
    return tuple(PolicyUse(r.id, r.version) for r in refs)  # type: ignore[attr-defined]


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
        self._receipt_key: ed25519.Ed25519PublicKey | None = None

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
        if code is grpc.StatusCode.UNAVAILABLE:
            return PeerError(
                f"{self.address} is unreachable or refused the TLS handshake (is it running, and "
                f"do both sides trust the same data-space CA?): {details}"
            )
        return error_from_status(code, details)

    def catalog(self) -> list[CatalogEntry]:
        """The datasets this provider grants to us, with columns and terms."""
        try:
            answer = self._stub.GetCatalog(pb.CatalogRequest(), timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None
        self._remember_key(answer.receipt_public_key_pem)
        return [
            CatalogEntry(
                name=d.name,
                description=d.description,
                columns=tuple((c.name, c.type) for c in d.columns),
                purposes=tuple(d.purposes),
                policies=_uses(d.policies),
                valid_from=d.valid_from.ToDatetime(dt.UTC),
                valid_until=d.valid_until.ToDatetime(dt.UTC),
            )
            for d in answer.datasets
        ]

    def explain(self, sql: str, purpose: str) -> PeerDecision:
        """The provider's decision for sql under purpose, without running it."""
        try:
            answer = self._stub.Explain(
                pb.QueryRequest(sql=sql, purpose=purpose), timeout=self.timeout
            )
        except grpc.RpcError as error:
            raise self._error(error) from None
        return PeerDecision(
            allow=answer.allow,
            reasons=tuple(answer.reasons),
            policies=_uses(answer.policies),
            relations=tuple((r.dataset, tuple(r.columns), r.definition) for r in answer.relations),
            datasets=tuple(answer.datasets),
            query_sha256=answer.query_sha256,
            obligations=json.loads(answer.obligations_json) if answer.obligations_json else {},
        )

    def stream(
        self, sql: str, purpose: str, *, max_rows: int = 0, request_id: str = ""
    ) -> Iterator[pb.QueryResponse]:
        """The raw response stream: arrow_ipc pieces, then the receipt."""
        request = pb.QueryRequest(
            sql=sql, purpose=purpose, max_rows=max_rows, request_id=request_id
        )
        try:
            yield from self._stub.Query(request, timeout=self.timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None

    def query(
        self, sql: str, purpose: str, *, max_rows: int = 0, request_id: str = ""
    ) -> QueryResult:
        """Run sql under purpose; the rows as a pyarrow.Table with the verified receipt."""
        pieces: list[bytes] = []
        token = ""
        for message in self.stream(sql, purpose, max_rows=max_rows, request_id=request_id):
            if message.HasField("receipt"):
                token = message.receipt.jws
            else:
                pieces.append(message.arrow_ipc)
        if not token:
            raise PeerError(f"{self.address} ended the result without a receipt; do not trust it")
        data = b"".join(pieces)
        receipt = self.verify_receipt(token, data)
        return QueryResult(read_ipc_pieces([data]), receipt, token, data)

    def verify_receipt(self, token: str, data: bytes) -> ReceiptFields:
        """Check a receipt's signature with the provider's key and its digest against data."""
        import hashlib

        if self._receipt_key is None:
            self.catalog()
        assert self._receipt_key is not None
        try:
            fields = verify_receipt(token, self._receipt_key)
        except JwsError as exc:
            raise PeerError(f"the receipt from {self.address} does not verify: {exc}") from None
        if fields.result_sha256 != hashlib.sha256(data).hexdigest():
            raise PeerError(f"the data from {self.address} does not match its receipt's digest")
        return fields

    def _remember_key(self, pem: str) -> None:
        key = serialization.load_pem_public_key(pem.encode())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise PeerError(f"{self.address} published a receipt key that is not Ed25519")
        self._receipt_key = key
