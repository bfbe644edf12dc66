"""A dataset's version log: every ingest, with its rows before and after and the file it
came from (name and sha256). It is the manifest a watched folder loads each file once by,
and where an incremental read finds the rows appended since a version.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import duckdb

from connector.store import open_read_only


@dataclass(frozen=True)
class VersionInfo:
    """One ingest in a dataset's version log: the manifest of what was loaded."""

    version: int
    mode: str
    rows_before: int
    rows_after: int
    source: str
    sha256: str
    ingested_at: dt.datetime


def read_versions(con: duckdb.DuckDBPyConnection, dataset: str) -> list[VersionInfo]:
    """The dataset's version log, oldest first (empty for an unknown dataset)."""
    rows = con.execute(
        "SELECT version, mode, rows_before, rows_after, source, sha256, ingested_at "
        "FROM _connector.dataset_versions WHERE name = ? ORDER BY version",
        [dataset],
    ).fetchall()
    return [VersionInfo(int(v), m, int(b), int(a), s, h, t) for v, m, b, a, s, h, t in rows]


def list_versions(db_path: Path, dataset: str) -> list[VersionInfo]:
    """The version log of dataset in a member database (opened read-only)."""
    with open_read_only(db_path) as con:
        try:
            return read_versions(con, dataset)
        except duckdb.CatalogException:
            return []  # written before versions were kept


def rows_at(con: duckdb.DuckDBPyConnection, dataset: str, version: int) -> int | None:
    """The rows dataset had once version was loaded (None: no such version)."""
    row = con.execute(
        "SELECT rows_after FROM _connector.dataset_versions WHERE name = ? AND version = ?",
        [dataset, version],
    ).fetchone()
    return int(row[0]) if row else None
