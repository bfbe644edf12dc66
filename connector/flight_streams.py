"""The answers the Flight SQL port is sending: each one streamed batch by batch with its
receipt last, counted per member, and recorded once, by its stream or by the port's stop."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

import pyarrow as pa
from pyarrow import flight

from connector.audit_entry import AuditEntry
from connector.errors import (
    ConnectorError,
    QueryCancelled,
    QueryRejected,
    QueryStalled,
    ResourceExhausted,
    ShuttingDown,
)
from connector.flight_answer import IpcFeed, receipt_metadata
from connector.flight_status import flight_error
from connector.peer_failures import STOPPING
from connector.provider import Provider
from connector.query_run import QueryRun

log = logging.getLogger(__name__)

UNREAD_SECONDS = 1.0  # at stop, answers whose peers read nothing for this long are not awaited
# After the grace, stopped queries need a moment to notice the interrupt and record themselves.
DRAIN_SECONDS = 5.0

# The endpoint's refusal: records the entry and raises the Flight error (entry, error, method).
Refuse = Callable[[AuditEntry, Exception, str], NoReturn]


class AnswerStreams:
    """The answers being sent and their audit entries: whoever takes a run out of here (its
    stream, or stop_all() for a peer that does not read) writes its one entry."""

    def __init__(self, provider: Provider, refuse: Refuse) -> None:
        self._provider = provider
        self._refuse = refuse
        self._running: dict[QueryRun, AuditEntry] = {}
        self._stopping = False
        # Answers being sent, by member. A stalled peer's query is stopped, but pyarrow keeps
        # its call (and thread) until the peer goes: counted here, not by the query slots.
        self._sending: Counter[str] = Counter()
        self._waiting = 0  # DoGets waiting for one of their member's answers to end
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)  # told when an answer stops sending

    def stop_all(self) -> None:
        """Stop the running answers' queries and write the audit entry of each (also of
        answers nobody reads, after DRAIN_SECONDS)."""
        with self._lock:
            self._stopping = True
            runs = list(self._running)
        for run in runs:
            run.cancel()
        # Streams a peer reads end now and record themselves; the others are recorded here.
        until = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < until and not self.all_unread(at_least=0.0):
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

    def all_unread(self, at_least: float = UNREAD_SECONDS) -> bool:
        """Every answer still running waits for a peer that has not read for at_least seconds
        (True also when none runs, once stopping)."""
        with self._lock:
            runs = list(self._running)
            stopping = self._stopping
        if not runs:
            return stopping
        return all(run.waiting_for_peer() > at_least for run in runs)

    def check_sending(self, member_id: str) -> None:
        """Wait while a member's answers still being sent fill its share of the queries, as
        long as a query waits for a slot (queue_seconds), in a queue as long as the slots'
        (queue_length); ResourceExhausted when it stays full or the queue is."""
        slots = self._provider.slots
        most = slots.per_member
        with self._sent:
            if self._sending[member_id] < most:
                return
            if self._waiting >= slots.queue_length:
                raise ResourceExhausted(
                    f"you already receive {most} answers at once on this port, the most one "
                    f"member may, and {self._waiting} more requests wait; read or close your "
                    "answers first"
                )
            self._waiting += 1
            try:
                free = self._sent.wait_for(
                    lambda: self._sending[member_id] < most, slots.queue_seconds
                )
            finally:
                self._waiting -= 1
            if not free:
                raise ResourceExhausted(
                    f"you already receive {most} answers at once on this port, the most one "
                    f"member may, and none ended within {slots.queue_seconds:g} s; read or "
                    "close them first"
                )

    def stream(self, run: QueryRun, entry: AuditEntry, member_id: str) -> flight.FlightDataStream:
        """The started run as a Flight stream (refused through the endpoint if it cannot open)."""
        try:
            # pieces() yields nothing before the request is on disk: a small answer's final
            # entry, else its "opened" entry (one fsync either way).
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
                raise flight_error(ShuttingDown(STOPPING))  # stop_all() recorded it
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
            with self._sent:
                self._running.pop(run, None)
                self._sending[member_id] -= 1
                self._sent.notify_all()
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
