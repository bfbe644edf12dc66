"""The member's DuckDB file: opening and creating it, and its dataset metadata (the owner's
side). Loading files into it is store_ingest.py.

Datasets are tables `datasets."<name>"`; their metadata lives in `_connector.datasets`.
Peers never name these: `sandbox.py` is their read path.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import duckdb

from connector.errors import StoreBusy, StoreError
from connector.sqltext import quote_identifier

_METADATA_DDL = """
CREATE SCHEMA IF NOT EXISTS datasets;
CREATE SCHEMA IF NOT EXISTS _connector;
CREATE TABLE IF NOT EXISTS _connector.datasets (
    name VARCHAR PRIMARY KEY, description VARCHAR NOT NULL, rows BIGINT NOT NULL,
    columns_json VARCHAR NOT NULL, source VARCHAR NOT NULL, mode VARCHAR NOT NULL,
    ingested_at TIMESTAMPTZ NOT NULL
);
ALTER TABLE _connector.datasets ADD COLUMN IF NOT EXISTS version BIGINT DEFAULT 1;
CREATE TABLE IF NOT EXISTS _connector.dataset_versions (
    name VARCHAR NOT NULL, version BIGINT NOT NULL, mode VARCHAR NOT NULL,
    rows_before BIGINT NOT NULL, rows_after BIGINT NOT NULL, source VARCHAR NOT NULL,
    sha256 VARCHAR NOT NULL, ingested_at TIMESTAMPTZ NOT NULL
);
"""
# Datasets are never updated or deleted from, only appended to or replaced: a row's rowid is
# its position, so the rows an append added are the rowids from rows_before to rows_after.


@dataclass(frozen=True)
class ColumnInfo:
    """A dataset column: lower-case name and DuckDB type."""

    name: str
    type: str


@dataclass(frozen=True)
class DatasetInfo:
    """What the store records about a dataset."""

    name: str
    description: str
    rows: int
    columns: tuple[ColumnInfo, ...]
    ingested_at: dt.datetime
    version: int = 1  # increased by every ingest
    replaced_at: int = 1  # the version of the last replace: rows since a later one are appends


def busy_or_error(exc: duckdb.Error, path: Path) -> Exception:
    text = str(exc)
    # DuckDB has no exception type of its own for a file locked by another process: it is an
    # IOException like a missing or unreadable file, told apart only by its message.
    # In one process DuckDB says instead that the file is attached already.
    held = isinstance(exc, duckdb.IOException) and "lock" in text.lower()
    if held or "already attached" in text:
        pid = re.search(r"PID (\d+)", text)
        holder = f" (process {pid.group(1)})" if pid else ""
        return StoreBusy(
            f"{path} is in use by a running connector{holder}: `connector ingest` and "
            "`connector datasets` go through it; for anything else stop the server, run the "
            "command again, then start the server"
        )
    return StoreError(f"cannot open {path}: {text.splitlines()[0]}")


def create_database(path: Path) -> None:
    """Create an empty member database with the metadata schema."""
    with open_writable(path) as con:
        con.execute(_METADATA_DDL)


def prepare_metadata(con: duckdb.DuckDBPyConnection) -> None:
    """Create (or bring up to date) the metadata tables in the database con uses."""
    con.execute(_METADATA_DDL)


def open_writable(path: Path) -> duckdb.DuckDBPyConnection:
    """A writable connection to the database file at path (StoreBusy while another holds it)."""
    try:
        return duckdb.connect(str(path))
    except duckdb.Error as exc:
        raise busy_or_error(exc, path) from None


def columns_of(con: duckdb.DuckDBPyConnection, table: str) -> tuple[ColumnInfo, ...]:
    """The columns of dataset table in the database con uses by default (none: no table)."""
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = current_database() AND schema_name = 'datasets' "
        "AND table_name = ? ORDER BY column_index",
        [table],
    ).fetchall()
    return tuple(ColumnInfo(str(n), str(t)) for n, t in rows)


def read_metadata(con: duckdb.DuckDBPyConnection) -> dict[str, DatasetInfo]:
    """The datasets recorded in the database con uses by default."""
    versioned = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = '_connector' AND table_name = 'dataset_versions'"
    ).fetchone()
    if versioned and versioned[0]:
        rows = con.execute(
            "SELECT d.name, d.description, d.rows, d.columns_json, d.ingested_at, d.version, "
            "coalesce(max(v.version) FILTER (WHERE v.mode = 'replace'), 1) "
            "FROM _connector.datasets d LEFT JOIN _connector.dataset_versions v "
            "ON v.name = d.name GROUP BY ALL ORDER BY d.name"
        ).fetchall()
    else:  # a database written before versions were kept: every dataset is at version 1
        rows = con.execute(
            "SELECT name, description, rows, columns_json, ingested_at, 1, 1 "
            "FROM _connector.datasets ORDER BY name"
        ).fetchall()
    return {
        name: DatasetInfo(
            name,
            desc,
            int(count),
            tuple(ColumnInfo(n, t) for n, t in json.loads(cols)),
            when,
            int(version or 1),
            int(replaced),
        )
        for name, desc, count, cols, when, version, replaced in rows
    }


def empty_copy(datasets: list[DatasetInfo], folder: Path) -> Path:
    """A database in folder with the datasets' tables and metadata but no rows: what the
    offline tools decide on (names, columns, types) while the server holds the real file."""
    path = folder / "datasets-without-rows.duckdb"
    with open_writable(path) as con:
        con.execute(_METADATA_DDL)
        for info in datasets:
            columns = ", ".join(f"{quote_identifier(c.name)} {c.type}" for c in info.columns)
            con.execute(f"CREATE TABLE datasets.{quote_identifier(info.name)} ({columns})")
            con.execute(
                "INSERT INTO _connector.datasets "
                "(name, description, rows, columns_json, source, mode, ingested_at, version) "
                "VALUES (?, ?, 0, ?, '', 'replace', ?, ?)",
                [
                    info.name,
                    info.description,
                    json.dumps([[c.name, c.type] for c in info.columns]),
                    info.ingested_at,
                    info.version,
                ],
            )
    return path


def open_read_only(db_path: Path) -> duckdb.DuckDBPyConnection:
    """A read-only connection to a member database (StoreBusy while a server holds it)."""
    if not db_path.exists():
        raise StoreError(f"{db_path} does not exist: run `connector init` first")
    try:
        return duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error as exc:
        raise busy_or_error(exc, db_path) from None


def list_datasets(db_path: Path) -> list[DatasetInfo]:
    """The datasets in a member database (opened read-only)."""
    with open_read_only(db_path) as con:
        try:
            return list(read_metadata(con).values())
        except duckdb.CatalogException:
            return []
