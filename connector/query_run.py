"""One running query: the peer's SQL on the sandbox, cut to its limits, then its receipt.

A QueryRun is made by `Provider.query` once the decision allows the query. It streams Arrow
IPC pieces with bounded memory, claims daily rows before they are sent, and ends with the
audit entry written, then the signed receipt.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Generator
from typing import Protocol

import pyarrow as pa

from connector.arrow_stream import IpcPieces
from connector.audit import AuditEntry
from connector.errors import StoreError
from connector.identity import MemberIdentity
from connector.policy.model import tightest
from connector.quota import QuotaLedger
from connector.receipt import ReceiptFields, ReceiptSigner, policy_uses
from connector.request import Explanation, PeerRequest
from connector.sandbox import SandboxDatabase, SandboxSession

OBLIGATIONS_METADATA_KEY = "connector.obligations"
POLICIES_METADATA_KEY = "connector.policies"


class AnsweringSide(Protocol):
    """What a running query needs of the provider that started it."""

    member_id: str
    sandbox: SandboxDatabase
    signer: ReceiptSigner
    quotas: QuotaLedger
    batch_rows: int
    max_query_seconds: float

    def record(self, entry: AuditEntry, error: BaseException | None = None) -> int: ...

    def release_slot(self) -> None: ...


class QueryRun:
    """One running query: yields Arrow IPC pieces, then its signed receipt."""

    def __init__(
        self,
        provider: AnsweringSide,
        member: MemberIdentity,
        request: PeerRequest,
        explanation: Explanation,
        entry: AuditEntry,
    ) -> None:
        self._provider = provider
        self.entry = entry
        self._member = member
        self._request = request
        self._explanation = explanation
        self._session: SandboxSession = provider.sandbox.session()
        self._lock = threading.Lock()
        self._finished = False
        self.rows = 0
        self.truncated = False
        self._pieces: IpcPieces | None = None

    def cancel(self) -> None:
        """Interrupt the query in DuckDB (the peer went away or its deadline passed)."""
        with self._lock:
            if not self._finished:
                self._session.interrupt()

    def pieces(self, deadline_seconds: float | None = None) -> Generator[bytes, None, None]:
        """Run the query and yield Arrow IPC bytes; bounded memory whatever the result size."""
        timeout = self._provider.max_query_seconds
        if deadline_seconds is not None:
            timeout = max(0.001, min(timeout, deadline_seconds))
        try:
            sql = self._explanation.sql
            self._session.expose(self._explanation.relations)
            self._session.verify_plan(sql, self._explanation.relations)
            result = self._session.stream(sql, self._provider.batch_rows, timeout)
            pieces = self._pieces = IpcPieces(self._labelled(result.schema))
            cap = tightest((self._request.max_rows, self._explanation.max_rows))
            for whole in result:
                batch = whole
                if cap and self.rows + whole.num_rows > cap:
                    batch = whole.slice(0, cap - self.rows)
                    self.truncated = True
                batch = self._within_quota(batch)
                if batch.num_rows:
                    self.rows += batch.num_rows
                    yield pieces.encode(batch)
                if self.truncated:
                    break
            yield pieces.finish()
        finally:
            # A peer that goes away mid-stream is recorded by the transport, which knows
            # what it handed over.
            self.close()

    def _within_quota(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The part of batch the daily row quotas still allow (claimed before it is sent)."""
        quotas = self._explanation.quotas
        if not any(q.rows_per_day for q in quotas) or not batch.num_rows:
            return batch
        granted = self._provider.quotas.claim_rows(
            self._member.member_id, quotas, batch.num_rows, _now()
        )
        if granted < batch.num_rows:
            self.truncated = True
            return batch.slice(0, granted)
        return batch

    def _labelled(self, schema: pa.Schema) -> pa.Schema:
        """The result schema with the obligations and policies in its metadata, for the
        peer's tools."""
        decision = self._explanation.decision
        policies = [f"{p.id}@{p.version}" for p in policy_uses(decision.policies)]
        return schema.with_metadata(
            {
                **(schema.metadata or {}),
                OBLIGATIONS_METADATA_KEY: json.dumps(dict(decision.obligations), sort_keys=True),
                POLICIES_METADATA_KEY: json.dumps(policies),
            }
        )

    def receipt(self) -> tuple[ReceiptFields, str]:
        """Record the completed run in the audit log, then sign its receipt."""
        if self._pieces is None:
            raise StoreError("the query produced no result to give a receipt for")
        entry = self.entry
        entry.rows, entry.bytes = self.rows, self._pieces.bytes_sent
        entry.result_sha256, entry.truncated = self._pieces.sha256, self.truncated
        entry.outcome = "answered"
        seq = self._provider.record(entry)
        fields = ReceiptFields(
            request_id=self._request.request_id,
            member_id=self._member.member_id,
            provider_id=self._provider.member_id,
            purpose=self._request.purpose,
            query_sha256=self._explanation.shape.sha256,
            result_sha256=self._pieces.sha256,
            rows=self.rows,
            bytes=self._pieces.bytes_sent,
            truncated=self.truncated,
            policies=policy_uses(self._explanation.decision.policies),
            audit_seq=seq,
            obligations=dict(self._explanation.decision.obligations),
            client_reference=entry.client_reference,
        )
        return fields, self._provider.signer.sign(fields)

    def close(self) -> None:
        """Release the DuckDB session and the query slot; safe to call more than once."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._session.close()
        self._provider.release_slot()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
