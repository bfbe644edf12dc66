"""The request thread pool starts every thread at once and never starts one later."""

from __future__ import annotations

import threading
from concurrent.futures import wait

import pytest

from connector.thread_pool import PrestartedThreadPool


def test_every_worker_starts_with_the_pool() -> None:
    pool = PrestartedThreadPool(max_workers=6, thread_name_prefix="t")
    try:
        assert pool.started() == 6
    finally:
        pool.shutdown()


def test_a_full_pool_works_when_no_thread_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = PrestartedThreadPool(max_workers=4, thread_name_prefix="t")
    workers = {thread.ident for thread in pool._threads}

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    busy = threading.Barrier(4)  # all four workers busy at once, then many more tasks
    try:
        first = [pool.submit(lambda: (busy.wait(10), threading.get_ident())[1]) for _ in range(4)]
        rest = [pool.submit(threading.get_ident) for _ in range(40)]
        done, _ = wait(first + rest, timeout=30)
        assert len(done) == 44
        assert {future.result() for future in done} <= workers
    finally:
        monkeypatch.undo()
        pool.shutdown()
