"""`connector serve` with the SQL guard switched off: a test build only.

Run as `python -m tests.security.unguarded_serve serve --home HOME`, it shows that the
sandbox's own bounds (the process memory limit, DuckDB's settings, the plan check) stop an
attack alone. The guard is replaced in this process only; the connector has no such switch.
"""

from __future__ import annotations

import hashlib
import sys

from connector import foreground, server
from connector.cli.main import main
from connector.config import Settings
from connector.sqlguard import QueryShape

_start_server = server.start_server


def no_guard(sql: str) -> QueryShape:
    """A guard that checks nothing and claims the query reads part_defects (test only)."""
    return QueryShape(
        sql=sql,
        sha256=hashlib.sha256(sql.encode()).hexdigest(),
        datasets=("part_defects",),
        column_refs=frozenset(),
        uses_star=True,
    )


def _start_unguarded(
    settings: Settings, listen: str | None = None, flight_listen: str | None = None
) -> server.RunningServer:
    running = _start_server(settings, listen, flight_listen)
    running.provider.guard = no_guard
    return running


if __name__ == "__main__":
    foreground.start_server = _start_unguarded  # type: ignore[attr-defined]  # what serve starts
    sys.exit(main(sys.argv[1:]))
