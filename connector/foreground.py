"""`connector serve` in the foreground: allocators tuned, the server started, its address
space limited, then signals: SIGTERM/SIGINT stop it cleanly, SIGHUP reloads."""

from __future__ import annotations

import logging
import signal

from connector.config import Settings
from connector.process_memory import limit_address_space, prepare_allocators, process_allowance
from connector.server import RunningServer, start_server
from connector.signal_inbox import SignalInbox

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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def serve_forever(
    settings: Settings, listen: str | None = None, flight_listen: str | None = None
) -> bool:
    """Run in the foreground until SIGTERM or SIGINT; SIGHUP reloads policies and revocations.
    False when a Flight SQL call is still held after the stop (see `FlightEndpoint.stop`):
    everything is closed and written, and the process should end at once."""
    prepare_allocators()
    # Taken before the server starts: a SIGTERM sent as soon as the port is announced still
    # stops it cleanly, with its checkpoint.
    with SignalInbox((*STOP_SIGNALS, signal.SIGHUP)) as inbox:
        running = start_server(settings, listen, flight_listen)
        try:
            _limit_memory(settings)
            _until_stop_signal(inbox, running, settings.server.shutdown_grace_seconds)
        finally:
            running.stop()
            log.info("stopped")
        for number in inbox.wait(0):
            log.info("%s received while stopping: ignored", number.name)
    return not running.flight_held


def _until_stop_signal(inbox: SignalInbox, running: RunningServer, grace: float) -> None:
    while True:
        for number in inbox.wait(None):
            if number in STOP_SIGNALS:
                log.info(
                    "%s received, stopping: running queries may finish within %g s",
                    number.name,
                    grace,
                )
                return
            log.info("SIGHUP received, reloading")
            running.ask_reload()
