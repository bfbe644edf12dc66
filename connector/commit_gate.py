"""The moment new data becomes visible: ingest commits never fall inside a query's start.

A query reads the dataset metadata (columns, version, rows) when it is decided, and DuckDB
takes its snapshot of the data when the query starts running. Between the two, a request
holds a pass through this gate; an ingest commits only while no pass is held, so what a
query was decided on is exactly what it reads. Once its query runs, the request leaves the
gate and DuckDB's snapshot keeps its view of the data, whatever commits later.

Commits go first: while one waits, new passes wait too, so a steady query load cannot hold
an ingest back, and a request waits at most for the passes held before it plus a commit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class GatePass:
    """One request's hold on the gate; leave() is safe to call more than once."""

    def __init__(self, gate: CommitGate) -> None:
        self._gate: CommitGate | None = gate
        self._lock = threading.Lock()
        self.generation = gate.generation  # the store's state this pass sees

    def leave(self) -> None:
        """Let commits through again (once every pass has left)."""
        with self._lock:
            gate, self._gate = self._gate, None
        if gate is not None:
            gate._leave()


class CommitGate:
    """Passes for requests, exclusive turns for commits (which go first); thread-safe."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._passes = 0
        self._commits_waiting = 0
        self._committing = False
        self._holds = 0  # copies of the file being taken: no commit may land meanwhile
        self.generation = 0  # increased by every commit

    def enter(self) -> GatePass:
        """A pass: waits while a commit waits or runs."""
        with self._changed:
            # While a hold keeps commits waiting, requests pass: a backup copy must not
            # stop the queries.
            while self._committing or (self._commits_waiting and not self._holds):
                self._changed.wait()
            self._passes += 1
            return GatePass(self)

    def _leave(self) -> None:
        with self._changed:
            self._passes -= 1
            if not self._passes:
                self._changed.notify_all()

    @contextmanager
    def commit(self) -> Iterator[None]:
        """An exclusive turn: no pass is held while the body runs."""
        with self._changed:
            self._commits_waiting += 1
            try:
                while self._committing or self._passes or self._holds:
                    self._changed.wait()
            finally:
                self._commits_waiting -= 1
            self._committing = True
        try:
            yield
        finally:
            with self._changed:
                self._committing = False
                self.generation += 1
                self._changed.notify_all()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """No commit lands while the body runs (requests still pass): for copying the
        store's files as of one moment."""
        with self._changed:
            while self._committing:
                self._changed.wait()
            self._holds += 1
        try:
            yield
        finally:
            with self._changed:
                self._holds -= 1
                self._changed.notify_all()
