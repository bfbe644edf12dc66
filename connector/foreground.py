"""`connector serve` in the foreground: allocators tuned, the server started, its address
space limited, then signals: SIGTERM/SIGINT stop it cleanly, SIGHUP reloads."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from connector.config import Settings
from connector.process_memory import limit_address_space, prepare_allocators, process_allowance
from connector.server import start_server

log = logging.getLogger(__name__)


def _limit_memory(settings: Settings) -> None:
    """The sandbox's own memory bound (process_memory.py): set once everything is loaded."""
    server = settings.server
    limit = limit_address_space(process_allowance(server.memory_limit, server.process_memory_limit))
    if limit is None:
        log.warning(
            "this platform cannot limit the server's address space: only DuckDB's memory_limit, "
            "which does not count strings that queries build, bounds a peer's query"
        )
        return
    log.info(
        "memory: the process may map %d MiB beyond the %d MiB it maps now (process_memory_limit)",
        limit.allowance >> 20,
        limit.mapped_at_start >> 20,
    )


def serve_forever(
    settings: Settings, listen: str | None = None, flight_listen: str | None = None
) -> bool:
    """Run in the foreground until SIGTERM or SIGINT; SIGHUP reloads policies and revocations.
    False when a Flight SQL call is still held after the stop (see `FlightEndpoint.stop`):
    everything is closed and written, and the process should end at once."""
    prepare_allocators()
    running = start_server(settings, listen, flight_listen)
    _limit_memory(settings)
    stop = threading.Event()

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.info("%s received, already stopping", name)
            return
        log.info(
            "%s received, stopping: running queries may finish within %g s",
            name,
            settings.server.shutdown_grace_seconds,
        )
        stop.set()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP received, reloading")
        running.ask_reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        while not stop.wait(3600):
            pass
    finally:
        running.stop()
        log.info("stopped")
    return not running.flight_held
