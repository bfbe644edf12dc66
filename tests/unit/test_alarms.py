"""The alarm clock that runs query deadlines and repeated interrupts on one thread."""

from __future__ import annotations

import gc
import itertools
import threading
import time
import weakref

from connector.alarms import AlarmClock


def test_alarms_run_in_time_order_not_call_order() -> None:
    clock = AlarmClock()
    ran: list[str] = []
    done = threading.Event()
    try:
        clock.call_later(0.2, done.set)
        clock.call_later(0.1, lambda: ran.append("second"))
        clock.call_later(0.0, lambda: ran.append("first"))
        assert done.wait(5)
        assert ran == ["first", "second"]
    finally:
        clock.stop()


def test_a_cancelled_alarm_does_not_run() -> None:
    clock = AlarmClock()
    ran: list[str] = []
    done = threading.Event()
    try:
        clock.call_later(0.05, lambda: ran.append("cancelled")).cancel()
        clock.call_later(0.1, done.set)
        assert done.wait(5)
        assert ran == []
    finally:
        clock.stop()


def test_a_callback_that_returns_seconds_runs_again_until_it_returns_none() -> None:
    clock = AlarmClock()
    runs: list[float] = []
    done = threading.Event()

    def again() -> float | None:
        runs.append(time.monotonic())
        if len(runs) == 4:
            done.set()
            return None
        return 0.02

    try:
        clock.call_later(0.0, again)
        assert done.wait(5)
        time.sleep(0.1)
        assert len(runs) == 4
        assert all(b - a >= 0.015 for a, b in itertools.pairwise(runs))
    finally:
        clock.stop()


def test_a_failing_callback_does_not_stop_the_clock() -> None:
    clock = AlarmClock()
    done = threading.Event()

    def fails() -> None:
        raise ValueError("boom")

    try:
        clock.call_later(0.0, fails)
        clock.call_later(0.05, done.set)
        assert done.wait(5)
    finally:
        clock.stop()


def test_after_stop_nothing_runs_and_the_thread_has_ended() -> None:
    clock = AlarmClock("ending")
    clock.start()
    ran: list[str] = []
    clock.call_later(0.05, lambda: ran.append("late"))
    clock.stop()
    clock.call_later(0.0, lambda: ran.append("after stop"))
    time.sleep(0.15)
    assert ran == []
    assert not any(t.name == "ending" for t in threading.enumerate())


def test_a_cancelled_alarm_lets_go_of_what_its_callback_holds_at_once() -> None:
    # A query's deadline holds its session; a cancelled deadline waits in the queue until
    # its time, and must not keep thousands of finished sessions alive meanwhile.
    class Session:
        def time_up(self) -> None:
            pass

    clock = AlarmClock()
    try:
        session = Session()
        held = weakref.ref(session)
        clock.call_later(3600, session.time_up).cancel()
        del session
        gc.collect()
        assert held() is None
    finally:
        clock.stop()
