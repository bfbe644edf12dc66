"""The audit log: one JSON line per request, hash-chained, anchored by signed checkpoints.

Each entry holds the hash of the one before; checkpoints signed with the connector's
receipt key anchor the chain, so `audit_chain.verify_log` finds changed, removed, inserted
or reordered entries and names the first one. Entries are fsync'd before the peer sees the
end of its answer; an answer sent before its final entry is written has an "opened" entry
fsync'd before its first byte (query_run.py: a small answer is recorded whole first).

The log is also hostile-input safe: peer-controlled fields are size-checked (audit_entry);
a member's refusals beyond a burst are counted, not written one by one (audit_refusals); and
when the file cannot be written a failed write is rolled back (the chain never holds a torn
line), the log refuses everything until it resumes by itself, first writing an "outage"
entry that counts what was refused meanwhile (audit_outage).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from connector.audit_chain import entry_hash, recover_tail
from connector.audit_entry import AuditEntry, now_text
from connector.audit_outage import UNAVAILABLE_REASON, Outage, write_failure_cause
from connector.audit_refusals import (
    ALWAYS_RECORDED,
    REFUSAL_BURST,
    REFUSALS_PER_SECOND,
    RefusalAllowance,
)
from connector.canonical import canonical_json
from connector.errors import AuditUnavailable, ResourceExhausted
from connector.receipt import ReceiptSigner

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 100


class AuditLog:
    """Append-only, fsync'd, hash-chained JSON Lines; thread-safe."""

    def __init__(
        self,
        path: Path,
        signer: ReceiptSigner,
        *,
        checkpoint_every: int = CHECKPOINT_EVERY,
        refusal_burst: int = REFUSAL_BURST,
        refusals_per_second: float = REFUSALS_PER_SECOND,
    ) -> None:
        self.path = path
        self._signer = signer
        self._every = checkpoint_every
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._seq, self._head = recover_tail(path)
        self._since_checkpoint = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size  # where the last whole line ends
        # Group commit: request entries are written under the lock and fsync'd after it, one
        # fsync covering every line written before it started. _synced is the state the
        # last fsync covered; _epoch changes when lines not yet fsync'd are dropped.
        self._sync_lock = threading.Lock()
        self._synced = (self._size, self._seq, self._head)
        self._epoch = 0
        self._refusals = RefusalAllowance(refusal_burst, refusals_per_second)
        self._outage: Outage | None = None
        self.on_change: Callable[[bool], None] | None = None  # told when writability changes
        # Told of each entry once it is on disk (metrics); runs under the log's lock.
        self.on_written: Callable[[dict[str, Any]], None] | None = None

    @property
    def head(self) -> tuple[int, str]:
        """Sequence number and hash of the last entry."""
        return self._seq, self._head

    @property
    def available(self) -> bool:
        """Whether the log can be written (requests are refused while it cannot)."""
        return self._outage is None

    def append(self, entry: AuditEntry) -> int:
        """Write the entry durably (fsync) once; returns its sequence number.

        A refusal beyond the member's allowance is counted for an aggregate entry instead
        (returns 0). Raises AuditUnavailable when the log cannot be written.
        """
        with self._lock:
            if entry.seq:
                return entry.seq
            refusal = entry.outcome not in ALWAYS_RECORDED and not entry.opened_seq
            if refusal and not self._allowance(entry):
                return 0
            record = {"type": "request", **entry.as_record()}
            if self._outage is not None and not self._retry(force=False):
                self._keep_for_later(entry, record)
            try:
                seq = entry.seq = self._write(record, sync=False)
            except AuditUnavailable:
                self._keep_for_later(entry, record)
                raise
            # Where this entry ends, before a checkpoint after it (whose failure may drop it,
            # changing the epoch) moves the end on.
            end, epoch = self._size, self._epoch
            self._after_write()
        try:
            self._sync_through(end, epoch)  # returns only once the entry is on disk
        except AuditUnavailable:
            with self._lock:
                entry.seq = 0
                self._keep_for_later(entry, record)
            raise
        return seq

    def opened(self, entry: AuditEntry) -> int:
        """Write the "opened" entry of an answer about to be sent (once: nothing is written
        again for an entry opened or finished already); AuditUnavailable (the refusal
        counted for the outage entry) if it cannot be written."""
        with self._lock:
            if entry.opened_seq or entry.seq:
                return entry.opened_seq
            written = False
            end, epoch = 0, self._epoch
            if self._outage is None or self._retry(force=False):
                with contextlib.suppress(AuditUnavailable):
                    record = {"type": "opened", **entry.opened_record()}
                    entry.opened_seq = self._write(record, sync=False)
                    end, epoch = self._size, self._epoch  # before a checkpoint, as above
                    self._after_write()
                    written = True
            if not written:
                return self._refuse_opened(entry)
        try:
            self._sync_through(end, epoch)  # nothing is sent before the entry is on disk
        except AuditUnavailable:
            with self._lock:
                entry.opened_seq = 0
                return self._refuse_opened(entry)
        return entry.opened_seq

    def _refuse_opened(self, entry: AuditEntry) -> NoReturn:
        if self._outage is not None:
            self._outage.refused[entry.member_id] += 1  # nothing was sent: a refusal
        raise AuditUnavailable(UNAVAILABLE_REASON)

    def _sync_through(self, end: int, epoch: int) -> None:
        """Return once the file is on disk up to byte end (written in epoch): one fsync for
        every entry written before it starts; AuditUnavailable if it fails or the entry was
        dropped as not durable."""
        with self._sync_lock:
            with self._lock:
                if self._epoch != epoch:
                    raise AuditUnavailable(UNAVAILABLE_REASON)
                if self._synced[0] >= end:
                    return  # an fsync that started after the entry was written covered it
                target = (self._size, self._seq, self._head)
                # A duplicate: the log may reopen its file meanwhile (outage recovery).
                fd = os.dup(self._fd)
            try:
                os.fsync(fd)
            except OSError as error:
                with self._lock:
                    if self._epoch == epoch:
                        self._drop_unsynced()
                        self._fail(error)
                raise AuditUnavailable(UNAVAILABLE_REASON) from None
            finally:
                os.close(fd)
            with self._lock:
                if self._epoch != epoch:
                    raise AuditUnavailable(UNAVAILABLE_REASON)
                if self._synced[0] < target[0]:
                    self._synced = target

    def _drop_unsynced(self) -> None:
        """An fsync failed: lines written since the last good one may be lost, so they are
        cut off and the chain goes back to where it was durable (their requests are refused)."""
        size, seq, head = self._synced
        if self._size == size:
            return
        self._epoch += 1
        self._seq, self._head, self._size = seq, head, size
        self._roll_back()

    def check_writable(self, member_id: str) -> None:
        """Raise AuditUnavailable while the log cannot be written; the refused request is
        counted for the outage entry (so do not append its entry as well)."""
        with self._lock:
            if self._outage is not None and not self._retry(force=False):
                self._outage.refused[member_id] += 1
                raise AuditUnavailable(UNAVAILABLE_REASON)

    def admit(self, member_id: str) -> None:
        """Refuse at once (before any other work) a request the log cannot record, or one
        from a member held back for its refused requests; the same on every wire."""
        self.check_writable(member_id)
        if self.throttled(member_id):
            raise ResourceExhausted(
                "too many of your recent requests were refused; wait a minute, then fix "
                "the requests before sending more"
            )

    def throttled(self, member_id: str) -> bool:
        """Whether member_id has sent more refused requests (its own faults) than allowed
        for now; its requests are then refused at once."""
        with self._lock:
            return self._refusals.throttled(member_id)

    def tick(self) -> bool:
        """Periodic work: retry an unwritable log, write due aggregates; returns available."""
        with self._lock:
            if self._outage is not None:
                self._retry(force=True)
            if self._outage is None:
                self._write_aggregates(force=False)
            return self._outage is None

    def checkpoint(self) -> None:
        """Anchor the chain now: a checkpoint entry signed with the connector's key."""
        with self._lock:
            if self._since_checkpoint and self._outage is None:
                self._checkpoint()

    def close(self) -> None:
        """Write pending aggregates and a checkpoint, then close the file (once)."""
        with self._lock:
            if self._fd < 0:
                return
            try:
                if self._outage is not None:
                    self._retry(force=True)
                if self._outage is None:
                    self._write_aggregates(force=True)
                    if self._since_checkpoint:
                        self._checkpoint()
            except AuditUnavailable:
                log.error("audit log %s closed without its last checkpoint", self.path)
            os.close(self._fd)
            self._fd = -1

    # -- refusals beyond the allowance ------------------------------------------------

    def _allowance(self, entry: AuditEntry) -> bool:
        """Take one recorded refusal from the member's allowance; count it if none is left."""
        if self._refusals.take(entry):
            return True
        if self._outage is None:
            # If this write fails the count stays, to be written once the log works again.
            with contextlib.suppress(AuditUnavailable):
                self._write_aggregates(force=False)
        return False

    def _write_aggregates(self, *, force: bool) -> None:
        self._refusals.write_aggregates(self._write, self._after_write, force=force)

    # -- writing, failing and recovering ----------------------------------------------

    def _after_write(self) -> None:
        self._since_checkpoint += 1
        if self._since_checkpoint >= self._every:
            # The entry itself is on disk; a later write anchors it.
            with contextlib.suppress(AuditUnavailable):
                self._checkpoint()

    def _checkpoint(self) -> None:
        claim = {"anchored_seq": self._seq, "head": self._head, "key_id": self._signer.key_id}
        token = self._signer.sign_json(claim)
        self._write({"type": "checkpoint", **claim, "jws": token})
        self._since_checkpoint = 0

    def _write(self, fields: dict[str, Any], *, sync: bool = True) -> int:
        if self._outage is not None:
            raise AuditUnavailable(UNAVAILABLE_REASON)
        return self._write_line(fields, sync=sync)

    def _write_line(self, fields: dict[str, Any], *, sync: bool = True) -> int:
        """Append one entry; fsync'd now, or by the caller's _sync_through when not sync."""
        seq = self._seq + 1
        entry = {"seq": seq, "time": now_text(), **fields, "prev": self._head}
        entry["hash"] = entry_hash(entry)
        line = (canonical_json(entry) + "\n").encode()
        try:
            self._put(line, sync)
        except OSError as error:
            self._drop_unsynced()  # the failure may have cost lines not yet fsync'd too
            self._fail(error)
            raise AuditUnavailable(UNAVAILABLE_REASON) from None
        self._seq, self._head = seq, entry["hash"]
        self._size += len(line)
        if sync:
            self._synced = (self._size, self._seq, self._head)
        if self.on_written is not None:
            try:
                self.on_written(entry)
            except Exception:
                log.exception("a listener of audit entries failed (the entry is written)")
        return seq

    def _put(self, line: bytes, sync: bool = True) -> None:
        """Write the whole line (and fsync it when sync), or leave the file as it was."""
        view = memoryview(line)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if sync:
                os.fsync(self._fd)
        except OSError:
            self._roll_back()
            raise

    def _roll_back(self) -> None:
        """Cut off what a failed write left (a torn line must never stay in the chain)."""
        try:
            if os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)
                os.fsync(self._fd)
        except OSError:
            log.warning("audit log %s: could not cut a failed write yet; will retry", self.path)

    def _fail(self, error: OSError) -> None:
        cause = write_failure_cause(error)
        if self._outage is None:
            self._outage = Outage(now_text(), cause, tried=time.monotonic())
            log.error(
                "audit log %s cannot be written (%s: %s); every request is refused until it "
                "can, and the health service says NOT_SERVING",
                self.path,
                cause,
                error.strerror or error,
            )
            self._notify(False)
        else:
            self._outage.tried = time.monotonic()

    def _keep_for_later(self, entry: AuditEntry, record: dict[str, Any]) -> None:
        """During an outage: a final entry of an opened answer is kept to be written on
        recovery; any other request is counted in the outage entry."""
        outage = self._outage
        if outage is None:
            return
        outage.keep(entry, record)
        raise AuditUnavailable(UNAVAILABLE_REASON)

    def _retry(self, *, force: bool) -> bool:
        """Try to write again (at most every RETRY_SECONDS unless forced); True if it works."""
        outage = self._outage
        if outage is None:
            return True
        if not outage.due(force=force):
            return False
        try:
            self._reopen()
            self._write_line(outage.record())
            outage.refused.clear()
            while outage.late:
                self._write_line({**outage.late[0], "late": True})
                outage.late.pop(0)
        except (OSError, AuditUnavailable):
            return False
        self._outage = None
        log.warning("audit log %s can be written again; serving", self.path)
        self._notify(True)
        self._after_write()
        return True

    def _reopen(self) -> None:
        """Open the file again (it may have been replaced or made writable) at a whole line."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.close(self._fd)
        self._fd = fd
        size = os.fstat(fd).st_size
        if size > self._size:
            os.ftruncate(fd, self._size)
            os.fsync(fd)
        elif size < self._size:
            log.error("audit log %s is shorter than what was written to it", self.path)
            self._size = size

    def _notify(self, available: bool) -> None:
        if self.on_change is not None:
            try:
                self.on_change(available)
            except Exception:
                log.exception("the audit log's availability listener failed")
