"""What a tiny query cannot go below on this machine, measured in the same run as it.

Three parts every answer needs, each timed alone: a gRPC stream carrying the connector's
own answer messages from a bare grpcio server (no policy, no DuckDB), DuckDB running the
one-row query in-process on a warm connection, and the fsync that puts the request's audit
entry on disk before anything is sent.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import duckdb

from connector.client import Peer


def write_messages(peer: Peer, sql: str, purpose: str, path: Path) -> int:
    """Save every message of one connector answer, receipt included, encoded and
    length-prefixed (for the bare server); how many there are."""
    count = 0
    with path.open("wb") as out:
        for message in peer.stream(sql, purpose):
            data = message.SerializeToString()
            out.write(len(data).to_bytes(8, "little"))
            out.write(data)
            count += 1
    return count


def duckdb_query(sql: str) -> Callable[[], object]:
    """One run of sql on a warm in-memory DuckDB connection holding a small part_events."""
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE part_events AS SELECT 'Plant-' || (range % 7) AS plant, "
        "CAST(range % 13 AS INTEGER) AS defects FROM range(100000)"
    )

    def once() -> object:
        return con.sql(sql).to_arrow_reader(65_536).read_all()

    return once


def fsync_append(folder: Path) -> Callable[[], object]:
    """One 300-byte line appended to a file in folder and fsync'd (an audit entry's cost)."""
    fd = os.open(folder / "fsync-floor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    line = b"x" * 299 + b"\n"

    def once() -> object:
        os.write(fd, line)
        os.fsync(fd)
        return None

    return once
