"""The member's DuckDB file: ingest and dataset metadata (the owner's side).

Datasets are tables `datasets."<name>"`; their metadata lives in `_connector.datasets`.
Peers never name these: `sandbox.py` is their read path.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa

from connector.errors import (
    AlreadyLoaded,
    DataError,
    StoreBusy,
    StoreError,
    first_line,
)
from connector.names import DATASET_NAME
from connector.sqltext import quote_identifier
from connector.staging import StagedFile

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class LoadRequest:
    """One ingest: which file, into which dataset, how."""

    source: Path
    dataset: str
    mode: Literal["replace", "append"] = "replace"
    description: str | None = None
    file_format: str | None = None
    csv_options: Mapping[str, str] = field(default_factory=dict)
    normalise_names: bool = False
    sha256: str = ""  # the file's content hash (recorded; see `once`)
    once: bool = False  # refuse a file whose content was loaded into the dataset before


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
    with _open_writable(path) as con:
        con.execute(_METADATA_DDL)


def prepare_metadata(con: duckdb.DuckDBPyConnection) -> None:
    """Create (or bring up to date) the metadata tables in the database con uses."""
    con.execute(_METADATA_DDL)


def _open_writable(path: Path) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path))
    except duckdb.Error as exc:
        raise busy_or_error(exc, path) from None


def _columns_of(con: duckdb.DuckDBPyConnection, table: str) -> tuple[ColumnInfo, ...]:
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = current_database() AND schema_name = 'datasets' "
        "AND table_name = ? ORDER BY column_index",
        [table],
    ).fetchall()
    return tuple(ColumnInfo(str(n), str(t)) for n, t in rows)


def check_dataset_name(dataset: str) -> None:
    """DataError unless dataset is a valid dataset name."""
    if not DATASET_NAME.fullmatch(dataset):
        raise DataError(
            f"invalid dataset name {dataset!r}: use 1-63 lower-case letters, digits and _, "
            "starting with a letter"
        )


def ingest(
    db_path: Path,
    source: Path,
    dataset: str,
    *,
    description: str | None,
    mode: Literal["replace", "append"],
    file_format: str | None = None,
    csv_options: Mapping[str, str] | None = None,
    normalise_names: bool = False,
) -> DatasetInfo:
    """Load source into dataset in one transaction: all rows or none (a CSV file is
    checked strictly first: see csv_strict.py). Opens the database file itself."""
    request = LoadRequest(
        source, dataset, mode, description, file_format, dict(csv_options or {}), normalise_names
    )
    return ingest_request(db_path, request)


def ingest_request(db_path: Path, request: LoadRequest) -> DatasetInfo:
    """Run one LoadRequest against the database file (no server holds it)."""
    check_dataset_name(request.dataset)
    with _staged(request) as staged, _open_writable(db_path) as con:
        con.execute(_METADATA_DDL)
        info = load(con, staged, request)
    log.info(
        "dataset %s: %s from %s, now %d rows (version %d)",
        info.name,
        request.mode,
        request.source,
        info.rows,
        info.version,
    )
    return info


def _staged(request: LoadRequest) -> StagedFile:
    return StagedFile(
        request.source,
        requested_format=request.file_format,
        csv_options=request.csv_options,
        normalise_names=request.normalise_names,
    )


def stage(request: LoadRequest) -> StagedFile:
    """The request's file opened for loading (checked strictly when CSV)."""
    check_dataset_name(request.dataset)
    return _staged(request)


Commit = Callable[[duckdb.DuckDBPyConnection], None]


def _commit(con: duckdb.DuckDBPyConnection) -> None:
    con.execute("COMMIT")


def load(
    con: duckdb.DuckDBPyConnection,
    staged: StagedFile,
    request: LoadRequest,
    commit: Commit = _commit,
) -> DatasetInfo:
    """Load a staged file into the member database con uses by default, in one transaction
    that commit(con) ends; the dataset's version increases by one."""
    dataset, source = request.dataset, request.source
    view = f"staged_{secrets.token_hex(8)}"
    select = ", ".join(
        f"{quote_identifier(n)} AS {quote_identifier(c)}"
        for n, c in zip(staged.names, staged.columns, strict=True)
    )
    target = f"datasets.{quote_identifier(dataset)}"
    con.register(view, staged.reader())
    con.execute("BEGIN TRANSACTION")
    try:
        if request.once and request.sha256:
            _refuse_loaded_before(con, dataset, request.sha256)
        existing = _columns_of(con, dataset)
        before = _current(con, dataset)
        if request.mode == "append" and existing:
            appended = _append_select(existing, staged.names, staged.columns, dataset)
            con.execute(f"INSERT INTO {target} SELECT {appended} FROM {view}")
        else:
            con.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT {select} FROM {view}")
        info = _record(con, request, before if existing else None)
        commit(con)
    except (duckdb.Error, pa.ArrowException, OSError) as exc:
        _rollback(con)
        raise DataError(
            f"cannot load {source.name} into {dataset}: {first_line(exc)}; nothing was changed"
        ) from None
    except BaseException:
        _rollback(con)
        raise
    finally:
        con.unregister(view)
    return info


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        log.debug("nothing to roll back", exc_info=True)


def _refuse_loaded_before(con: duckdb.DuckDBPyConnection, dataset: str, sha256: str) -> None:
    row = con.execute(
        "SELECT version, source, ingested_at FROM _connector.dataset_versions "
        "WHERE name = ? AND sha256 = ? ORDER BY version LIMIT 1",
        [dataset, sha256],
    ).fetchone()
    if row is not None:
        raise AlreadyLoaded(
            f"the same content was loaded into {dataset} as version {row[0]} from {row[1]} "
            f"at {row[2]:%Y-%m-%d %H:%M:%S %Z}; not loaded again",
            source=str(row[1]),
        )


def _current(con: duckdb.DuckDBPyConnection, dataset: str) -> tuple[int, int, int]:
    """The dataset's (version, rows, last replace version); zeros when it does not exist."""
    row = con.execute(
        "SELECT d.version, d.rows, coalesce(max(v.version) FILTER (WHERE v.mode = 'replace'), "
        "0) FROM _connector.datasets d LEFT JOIN _connector.dataset_versions v "
        "ON v.name = d.name WHERE d.name = ? GROUP BY d.version, d.rows",
        [dataset],
    ).fetchone()
    return (int(row[0] or 0), int(row[1]), int(row[2])) if row else (0, 0, 0)


def _append_select(
    existing: tuple[ColumnInfo, ...], names: list[str], columns: list[str], dataset: str
) -> str:
    """The SELECT that appends the staged rows: same columns, cast to the dataset's types."""
    if columns != [c.name for c in existing]:
        have = ", ".join(c.name for c in existing)
        raise DataError(
            f"cannot append to {dataset}: its columns are ({have}) but the file has "
            f"({', '.join(names)}); fix the file or use --replace"
        )
    return ", ".join(
        f"CAST({quote_identifier(n)} AS {c.type}) AS {quote_identifier(c.name)}"
        for n, c in zip(names, existing, strict=True)
    )


def _record(
    con: duckdb.DuckDBPyConnection, request: LoadRequest, before: tuple[int, int, int] | None
) -> DatasetInfo:
    dataset = request.dataset
    rows_row = con.execute(f"SELECT count(*) FROM datasets.{quote_identifier(dataset)}").fetchone()
    rows = int(rows_row[0]) if rows_row else 0
    old = con.execute(
        "SELECT description, version FROM _connector.datasets WHERE name = ?", [dataset]
    ).fetchone()
    text = request.description if request.description is not None else (old[0] if old else "")
    # Versions only grow, also across a replace or a dataset dropped and loaded again.
    last = con.execute(
        "SELECT max(version) FROM _connector.dataset_versions WHERE name = ?", [dataset]
    ).fetchone()
    version = max(int(old[1] or 0) if old else 0, int(last[0] or 0) if last else 0) + 1
    appended = request.mode == "append" and before is not None
    mode = "append" if appended else "replace"
    rows_before = before[1] if appended and before else 0
    columns = _columns_of(con, dataset)
    now = dt.datetime.now(dt.UTC)
    con.execute(
        "INSERT OR REPLACE INTO _connector.datasets "
        "(name, description, rows, columns_json, source, mode, ingested_at, version) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            dataset,
            text,
            rows,
            json.dumps([[c.name, c.type] for c in columns]),
            request.source.name,
            request.mode,
            now,
            version,
        ],
    )
    con.execute(
        "INSERT INTO _connector.dataset_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [dataset, version, mode, rows_before, rows, request.source.name, request.sha256, now],
    )
    replaced_at = before[2] if appended and before and before[2] else version
    return DatasetInfo(dataset, text, rows, columns, now, version, replaced_at)


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
    with _open_writable(path) as con:
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
