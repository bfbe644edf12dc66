"""One running query: the peer's SQL on the sandbox, cut to its limits, then its receipt.

A QueryRun is made by `Provider.query` once the decision allows the query. It streams Arrow
IPC pieces with bounded memory, cuts the result at the row and byte limits, claims daily rows
and bytes before they are sent, and ends with the audit entry written, then the signed
receipt. Bytes are Arrow IPC bytes as sent: the schema message and the end-of-stream marker
count too, so every byte of the stream was claimed before it left.

Nothing leaves before the claims it was sent under (quota.py) and the request are on disk. A
small answer is worked out whole and recorded by its final entry before any of it is sent
(one entry, one fsync); a longer one by an "opened" entry before its first byte, and its
final entry before the receipt.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Protocol

import pyarrow as pa

from connector.arrow_stream import IpcPieces, check_piece_size, without_dictionaries
from connector.audit_entry import AuditEntry
from connector.canonical import canonical_json
from connector.commit_gate import GatePass
from connector.errors import (
    PermissionDenied,
    QueryTimeout,
    ResourceExhausted,
    StoreError,
)
from connector.identity import MemberIdentity
from connector.packing import built_collection, packing_refused
from connector.policy.model import tightest
from connector.policy.ref import policy_refs
from connector.quota import QuotaLedger, most_rows
from connector.receipt import ReceiptFields, ReceiptSigner
from connector.request import Explanation, PeerRequest
from connector.sandbox import SandboxDatabase
from connector.sandbox_session import SandboxSession
from connector.slots import Slot

log = logging.getLogger(__name__)

OBLIGATIONS_METADATA_KEY = "connector.obligations"
POLICIES_METADATA_KEY = "connector.policies"
END_OF_STREAM_BYTES = 8  # the Arrow IPC stream's end marker (continuation + zero length)


# An answer whose pieces come to at most this many bytes is worked out whole, then recorded,
# then sent (no "opened" entry); a longer one holds at most this much and one piece more.
HELD_ANSWER_BYTES = 256 * 1024


class AnswerOpener(Protocol):
    """The audit log's entry for an answer about to be sent before it ends (audit.AuditLog)."""

    def opened(self, entry: AuditEntry) -> int: ...


class AnsweringSide(Protocol):
    """What a running query needs of the provider that started it."""

    member_id: str
    sandbox: SandboxDatabase
    signer: ReceiptSigner
    quotas: QuotaLedger
    batch_rows: int
    max_query_seconds: float

    def record(self, entry: AuditEntry, error: BaseException | None = None) -> int: ...

    @property
    def audit(self) -> AnswerOpener: ...


class QueryRun:
    """One running query: yields Arrow IPC pieces, then its signed receipt."""

    def __init__(
        self,
        provider: AnsweringSide,
        member: MemberIdentity,
        request: PeerRequest,
        explanation: Explanation,
        entry: AuditEntry,
        *,
        slot: Slot,
        gate_pass: GatePass | None = None,
    ) -> None:
        """gate_pass: held until the query has started (then no commit can change what it
        was decided on); left at the latest when the run closes."""
        self._provider = provider
        self._slot = slot
        self._gate_pass = gate_pass
        self._waiting_since: float | None = None  # suspended at a yield since (monotonic)
        self.stalled = False
        self.end_stream: Callable[[], None] | None = None  # set by the transport
        self.entry = entry
        self._member = member
        self._request = request
        self._explanation = explanation
        self._session: SandboxSession = provider.sandbox.session()
        self._lock = threading.Lock()
        self._finished = False
        self.rows = 0
        self.truncated = False
        self.limited_by = ""  # the limit that cut the result
        self._pieces: IpcPieces | None = None
        self._counted = tuple(q for q in explanation.quotas if q.counts_sent)
        self._counts_bytes = bool(explanation.max_bytes) or any(
            q.bytes_per_day for q in explanation.quotas
        )
        self._bytes_claimed = 0
        self._handed = 0  # bytes the transport has taken and asked past

    def cancel(self) -> None:
        """Interrupt the query in DuckDB (the peer went away or its deadline passed); its
        slot is free at once, while DuckDB stops in the background."""
        with self._lock:
            if not self._finished:
                self._session.interrupt()
        self._slot.leave()

    @property
    def done(self) -> bool:
        """True once the run has ended and released its session."""
        return self._finished

    def waiting_for_peer(self) -> float:
        """Seconds the run has waited for the peer to take its last piece (0: not waiting)."""
        since = self._waiting_since
        return 0.0 if since is None else time.monotonic() - since

    def stall(self) -> None:
        """End the answer: the peer stopped reading (recorded as `stalled`)."""
        log.info("ending a query whose peer read nothing for %.1f s", self.waiting_for_peer())
        self.stalled = True
        if self.end_stream is not None:
            self.end_stream()
        self.cancel()

    def _handed_over(self, data: bytes) -> Generator[bytes, None, None]:
        self._waiting_since = time.monotonic()
        yield data
        self._waiting_since = None
        self._handed += len(data)
        if self._pieces is not None:
            self._pieces.handed_over(self._handed)

    def pieces(
        self, deadline_seconds: float | None = None, max_piece_bytes: int = 0
    ) -> Generator[bytes, None, None]:
        """Run the query and yield Arrow IPC bytes; bounded memory whatever the result size.
        Nothing is yielded before the request is on disk: the final audit entry of an answer
        of at most HELD_ANSWER_BYTES, else the "opened" entry (unless the transport wrote
        it already). max_piece_bytes: the transport's message limit (0: none), checked
        before a piece is recorded as sent."""
        produced = self._produced(deadline_seconds)
        try:
            held: list[bytes] = []
            size, whole = 0, False
            for piece in produced:
                check_piece_size(piece, max_piece_bytes)
                held.append(piece)
                size += len(piece)
                if size > HELD_ANSWER_BYTES:
                    break
            else:  # whole: its final entry is all the record it needs, and one message
                if len(held) > 1 and (not max_piece_bytes or size <= max_piece_bytes):
                    held = [b"".join(held)]
                whole = True
            self._provider.quotas.sync()  # what the held pieces claimed is on disk first
            if whole and not self.entry.opened_seq:
                self._record_answered()
            if not self.entry.seq:
                self._provider.audit.opened(self.entry)
            for piece in held:
                yield from self._handed_over(piece)
            held.clear()
            for piece in produced:
                check_piece_size(piece, max_piece_bytes)
                self._provider.quotas.sync()  # the rows and bytes of this piece, claimed
                yield from self._handed_over(piece)
        finally:
            produced.close()

    def _produced(self, deadline_seconds: float | None) -> Generator[bytes, None, None]:
        """The answer's pieces as they are worked out (see pieces)."""
        timeout = self._provider.max_query_seconds
        if deadline_seconds is not None and deadline_seconds <= 0:
            # The peer gave up while the query waited for a slot: do not start it.
            self.close()
            raise QueryTimeout("the query's deadline passed before it could start")
        if deadline_seconds is not None:
            timeout = max(0.001, min(timeout, deadline_seconds))
        try:
            sql = self._explanation.sql
            self._session.expose(self._explanation.relations)
            checked = self._session.verify_plan(sql, self._explanation.relations)
            self._refuse_packing(checked.packing)
            result = self._session.stream(sql, self._provider.batch_rows, timeout)
            self._leave_gate()  # DuckDB holds the query's snapshot now
            noise = self._explanation.noise  # noised answers: each batch noised, renamed
            measured = noise.schema(result.schema) if noise else result.schema
            self._refuse_packed_lists(measured)
            schema = self._labelled(measured)
            if self._counts_bytes:
                schema = without_dictionaries(schema)
            pieces = self._pieces = IpcPieces(schema)
            self._claim_frame(schema)
            for raw in result:
                whole = noise.apply(raw) if noise else raw
                batch = self._within_limits(whole.cast(schema) if self._counts_bytes else whole)
                if batch.num_rows:
                    self.rows += batch.num_rows
                    data = pieces.encode(batch)
                    self._check_claimed(pieces.bytes_sent)
                    yield data
                if self.truncated:
                    break
            yield pieces.finish()
        finally:
            # A peer that goes away mid-stream is recorded by the transport, which knows
            # what it handed over.
            self.close()

    @property
    def _limits_rows(self) -> bool:
        explanation = self._explanation
        return bool(explanation.max_rows or any(q.rows_per_day for q in explanation.quotas))

    def _refuse_packing(self, packing: str) -> None:
        """Second layer under row limits: the bound plan packs rows (the guard refuses the
        query first, from its text)."""
        if packing and self._limits_rows:
            raise PermissionDenied([packing_refused(packing)])

    def _refuse_packed_lists(self, schema: pa.Schema) -> None:
        """Second layer under row limits: a list or map the datasets do not hold was built
        by the query, so a row could carry many rows (the guard refuses this first)."""
        if not self._limits_rows:
            return
        types = (c.type for r in self._explanation.relations for c in r.columns)
        built = built_collection(schema, types)
        if built is not None:
            raise PermissionDenied(
                [packing_refused(f"result column {built!r} gathers many rows into one value")]
            )

    def _cut(self, limit: str) -> None:
        self.truncated, self.limited_by = True, limit

    def _within_limits(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The part of batch the row and byte limits still allow, claimed before it is sent."""
        cap = tightest((self._request.max_rows, self._explanation.max_rows))
        if cap and self.rows + batch.num_rows > cap:
            limit = "max_rows" if cap == self._request.max_rows else "max_rows_per_query"
            batch = batch.slice(0, cap - self.rows)
            self._cut(limit)
        wanted = batch.num_rows
        max_bytes = self._explanation.max_bytes
        if not wanted or not (self._counted or max_bytes):
            return batch
        left = max_bytes - self._bytes_claimed if max_bytes else None

        def size_of(rows: int) -> int:
            return batch.slice(0, rows).serialize().size if self._counts_bytes else 0

        if self._counted:
            rows, size, limit = self._provider.quotas.claim_sent(
                self._member.member_id, self._counted, wanted, size_of, now=_now(), max_bytes=left
            )
        else:
            rows = most_rows(wanted, size_of, -1 if left is None else left)
            size, limit = size_of(rows) if rows else 0, "max_bytes_per_query"
        self._bytes_claimed += size
        if rows < wanted:
            self._cut(limit)
        return batch.slice(0, rows)

    def _claim_frame(self, schema: pa.Schema) -> None:
        """Claim the schema message and end marker (all or nothing) before anything is sent."""
        if not self._counts_bytes:
            return
        frame = schema.serialize().size + END_OF_STREAM_BYTES
        max_bytes = self._explanation.max_bytes
        if max_bytes and frame > max_bytes:
            raise ResourceExhausted(
                f"the result's schema alone ({frame} bytes) exceeds the policy's "
                f"max_bytes_per_query ({max_bytes}); select fewer columns"
            )
        if self._counted:
            self._provider.quotas.claim_bytes(self._member.member_id, self._counted, frame, _now())
        self._bytes_claimed = frame

    def _check_claimed(self, sent: int) -> None:
        # The prediction (serialize) matches the stream writer byte for byte once dictionaries
        # are decoded; a difference would be a pyarrow change worth knowing about.
        if self._counts_bytes and sent + END_OF_STREAM_BYTES > self._bytes_claimed:
            log.warning(
                "sent %d bytes of which only %d were claimed",
                sent + END_OF_STREAM_BYTES,
                self._bytes_claimed,
            )

    def _labelled(self, schema: pa.Schema) -> pa.Schema:
        """The result schema with the obligations and policies in its metadata, for the
        peer's tools."""
        decision = self._explanation.decision
        policies = [str(ref) for ref in policy_refs(decision.policies)]
        return schema.with_metadata(
            {
                **(schema.metadata or {}),
                OBLIGATIONS_METADATA_KEY: canonical_json(dict(decision.obligations)),
                POLICIES_METADATA_KEY: canonical_json(policies),
            }
        )

    def digest_of_first(self, size: int) -> str:
        """Hex sha256 of the first size bytes of the answer ("" for none): what a transport
        handed over, at a piece boundary not before the last piece it took."""
        if self._pieces is None or not size:
            return ""
        try:
            return self._pieces.sha256_of_first(size)
        except ValueError:
            # Not a boundary this run kept: the entry is written without a digest rather
            # than lost (a transport counting what it never took would be a bug to fix).
            log.warning("no digest of the first %d bytes of answer %s", size, self.entry.request_id)
            return ""

    def _record_answered(self) -> int:
        """Write the completed run's final audit entry (once; fsync'd)."""
        if self._pieces is None:
            raise StoreError("the query produced no result to give a receipt for")
        entry = self.entry
        if entry.seq:
            return entry.seq
        entry.rows, entry.bytes = self.rows, self._pieces.bytes_sent
        entry.result_sha256, entry.truncated = self._pieces.sha256, self.truncated
        entry.limited_by = self.limited_by
        entry.outcome = "answered"
        return self._provider.record(entry)

    def receipt(self) -> tuple[ReceiptFields, str]:
        """Record the completed run in the audit log (unless it was before it was sent),
        then sign its receipt."""
        seq = self._record_answered()
        if self._pieces is None:  # for mypy: _record_answered refused a run without one
            raise StoreError("the query produced no result to give a receipt for")
        entry = self.entry
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
            limited_by=self.limited_by,
            policies=policy_refs(self._explanation.decision.policies),
            audit_seq=seq,
            obligations=dict(self._explanation.decision.obligations),
            client_reference=entry.client_reference,
            versions={
                name: [since, version] for name, since, version in self._explanation.versions
            },
        )
        return fields, self._provider.signer.sign(fields)

    def _leave_gate(self) -> None:
        if self._gate_pass is not None:
            self._gate_pass.leave()

    def close(self) -> None:
        """Release the DuckDB session and the query slot; safe to call more than once."""
        self._leave_gate()
        with self._lock:
            if self._finished:
                return
            self._finished = True
        self._session.close()
        self._slot.finish()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
