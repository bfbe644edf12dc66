"""A server whose memory is taken keeps answering: no request waits on a thread starting.

At the address-space limit no thread can start. gRPC hands each call to the request pool
from its one serving thread; a pool that started threads on demand raised there, that
thread ended, and the server took connections and answered none, ever (found by
test_memory_bounds.py's concurrent blow-ups). And stopping never waits on what a first
stop ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from connector.server import RunningServer
from tests.conftest import Member, ProviderPair, connect

SQL = "SELECT plant, sum(defects) AS defects FROM part_defects GROUP BY plant"


def test_many_concurrent_queries_are_answered_when_no_thread_can_start(
    provider_pair: ProviderPair,
    serve: Callable[[Member], RunningServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    provider, grantee = provider_pair()
    server = serve(provider)
    peers = [connect(server, grantee, timeout=15) for _ in range(12)]
    original = threading.Thread.start

    def only_clients_start(self: threading.Thread) -> None:
        # The server's own threads cannot start (as at its memory limit); the test's
        # threads and the clients' are not the server's.
        if self.name.startswith("rpc"):
            raise RuntimeError("can't start new thread")
        original(self)

    monkeypatch.setattr(threading.Thread, "start", only_clients_start)
    answers: list[int] = []
    failures: list[BaseException] = []

    def ask(index: int) -> None:
        try:
            for _ in range(3):
                answers.append(peers[index].query(SQL, "quality-benchmarking").num_rows)
        except Exception as error:  # reported below, with the others
            failures.append(error)

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(peers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        monkeypatch.undo()
        for peer in peers:
            peer.close()
    assert not failures, failures[:3]
    assert len(answers) == 36 and set(answers) == {4}


def test_a_second_stop_returns_at_once(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    # Fixtures stop what a test stopped already: the second stop must not wait (it waited
    # for the ingest socket's loads, 30 s) or touch what the first closed.
    provider, _ = provider_pair()
    server = serve(provider)
    server.stop(grace=1)
    started = time.monotonic()
    server.stop(grace=1)
    assert time.monotonic() - started < 5
