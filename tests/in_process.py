"""A peer that asks a running server's `Provider` directly, in this process, without gRPC.

Large attack tables run through it (a few milliseconds a query instead of a TLS connection
and two round trips); a sample of each table still goes over mutual TLS to the same server.
It does what the servicer does (connector/service.py): authenticate the member's certificate,
check the request, decide, stream, write the audit entry and sign the receipt. Errors come
back as the peer would see them: sent as a status code with their reasons and turned back
into exceptions (connector/status.py), so a StoreError arrives as a PeerError, as on the wire.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from connector.arrow_stream import read_ipc_pieces
from connector.audit_entry import AuditEntry
from connector.errors import ConnectorError, PeerError
from connector.provider import Provider
from connector.receipt import ReceiptBundle, verify_bundle
from connector.request import PeerRequest
from connector.status import error_from_status, reasons_metadata, status_of

# What the servicer sends for an exception that is not a ConnectorError (a bug).
INTERNAL = "the provider's connector failed unexpectedly"


class InProcessPeer:
    """One member asking a Provider in this process; errors as a remote peer receives them."""

    def __init__(self, provider: Provider, cert_pem: bytes, ca_pem: bytes) -> None:
        self.provider = provider
        self._cert_pem = cert_pem
        self._ca_pem = ca_pem

    def query(self, sql: str, purpose: str, *, max_rows: int = 0) -> pa.Table:
        """Run sql under purpose as the servicer would; the table, its receipt verified."""
        provider = self.provider
        entry = AuditEntry("query")
        try:
            member = provider.authenticate(self._cert_pem, entry)
            entry.query, entry.purpose = sql, purpose
            entry.query_sha256 = hashlib.sha256(sql.encode()).hexdigest()
            request = PeerRequest.checked(sql, purpose, max_rows, "")
            entry.request_id = request.request_id
            run = provider.query(member, request, entry)
        except Exception as error:
            raise self._refused(entry, error) from error
        pieces = run.pieces(provider.max_query_seconds)
        try:
            data = b"".join(pieces)
            _, token = run.receipt()
        except Exception as error:
            raise self._refused(entry, error) from error
        finally:
            pieces.close()
            run.close()
        signer = provider.signer
        bundle = ReceiptBundle(token, signer.endorsement.jws, signer.endorsement.certificate_pem)
        verify_bundle(bundle, self._ca_pem, data)
        return read_ipc_pieces([data])

    def _refused(self, entry: AuditEntry, error: Exception) -> ConnectorError:
        """Record the refusal, then the error the peer gets from the status sent for it."""
        self.provider.record(entry, error)
        if not isinstance(error, ConnectorError):
            return PeerError(f"INTERNAL: {INTERNAL}")
        return error_from_status(status_of(error), error.message, reasons_metadata(error))
