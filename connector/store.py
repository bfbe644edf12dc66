"""The member's DuckDB file: ingest and dataset metadata (the owner's side).

Datasets are tables `datasets."<name>"`; their metadata lives in `_connector.datasets`.
Peers never name these: `sandbox.py` is their read path.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import duckdb

from connector.column_names import dataset_columns
from connector.csv_strict import check_structure, dialect_from
from connector.errors import (
    DataError,
    StoreBusy,
    StoreError,
)
from connector.names import DATASET_NAME
from connector.sqltext import quote_identifier, sql_string

log = logging.getLogger(__name__)

FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".json": "json",
    ".ndjson": "json",
    ".jsonl": "json",
}
_READERS = {"csv": "read_csv", "parquet": "read_parquet", "json": "read_json_auto"}
_METADATA_DDL = """
CREATE SCHEMA IF NOT EXISTS datasets;
CREATE SCHEMA IF NOT EXISTS _connector;
CREATE TABLE IF NOT EXISTS _connector.datasets (
    name VARCHAR PRIMARY KEY, description VARCHAR NOT NULL, rows BIGINT NOT NULL,
    columns_json VARCHAR NOT NULL, source VARCHAR NOT NULL, mode VARCHAR NOT NULL,
    ingested_at TIMESTAMPTZ NOT NULL
);
"""


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


def busy_or_error(exc: duckdb.Error, path: Path) -> Exception:
    text = str(exc)
    # DuckDB has no exception type of its own for a file locked by another process: it is an
    # IOException like a missing or unreadable file, told apart only by its message.
    if isinstance(exc, duckdb.IOException) and "lock" in text.lower():
        pid = re.search(r"PID (\d+)", text)
        holder = f" (process {pid.group(1)})" if pid else ""
        return StoreBusy(
            f"{path} is in use by a running connector{holder}; stop the server, run the "
            "command again, then start the server"
        )
    return StoreError(f"cannot open {path}: {text.splitlines()[0]}")


def create_database(path: Path) -> None:
    """Create an empty member database with the metadata schema."""
    with _open_writable(path) as con:
        con.execute(_METADATA_DDL)


def _open_writable(path: Path) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path))
    except duckdb.Error as exc:
        raise busy_or_error(exc, path) from None


def _file_format(source: Path, file_format: str | None) -> str:
    fmt = file_format or FORMATS.get(source.suffix.lower())
    if fmt not in _READERS:
        raise DataError(
            f"cannot tell the format of {source.name}: use a .csv, .parquet or .json file, "
            "or pass --format csv|parquet|json"
        )
    return fmt


def _columns_of(con: duckdb.DuckDBPyConnection, table: str) -> tuple[ColumnInfo, ...]:
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE schema_name = 'datasets' AND table_name = ? ORDER BY column_index",
        [table],
    ).fetchall()
    return tuple(ColumnInfo(str(n), str(t)) for n, t in rows)


def _staged_columns(con: duckdb.DuckDBPyConnection) -> list[str]:
    # DuckDB's readers already rename names that collide case-insensitively (A, a -> A, a_1).
    return [str(d[0]) for d in con.execute("SELECT * FROM staged LIMIT 0").description]


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
    checked strictly first: see csv_strict.py)."""
    if not DATASET_NAME.fullmatch(dataset):
        raise DataError(
            f"invalid dataset name {dataset!r}: use 1-63 lower-case letters, digits and _, "
            "starting with a letter"
        )
    if not source.is_file():
        raise DataError(f"{source} does not exist or is not a file")
    fmt = _file_format(source, file_format)
    options = ""
    if fmt == "csv":
        dialect = dialect_from(csv_options or {}, source)
        check_structure(source, dialect)
        options = ", " + dialect.reader_options()
    elif csv_options:
        raise DataError("--csv-option applies to CSV files only")
    reader = _READERS[fmt]
    with _open_writable(db_path) as con:
        con.execute(_METADATA_DDL)
        try:
            literal = sql_string(str(source))
            con.execute(f"CREATE TEMP VIEW staged AS SELECT * FROM {reader}({literal}{options})")
            names = _staged_columns(con)
        except duckdb.Error as exc:
            raise DataError(f"cannot read {source}: {str(exc).splitlines()[0]}") from None
        columns = dataset_columns(names, normalise=normalise_names)
        select = ", ".join(
            f"{quote_identifier(n)} AS {quote_identifier(c)}"
            for n, c in zip(names, columns, strict=True)
        )
        target = f"datasets.{quote_identifier(dataset)}"
        con.execute("BEGIN TRANSACTION")
        try:
            existing = _columns_of(con, dataset)
            if mode == "append" and existing:
                appended = _append_select(existing, names, columns, dataset)
                con.execute(f"INSERT INTO {target} SELECT {appended} FROM staged")
            else:
                con.execute(f"CREATE OR REPLACE TABLE {target} AS SELECT {select} FROM staged")
            info = _record(con, dataset, description, source, mode)
            con.execute("COMMIT")
        except duckdb.Error as exc:
            con.execute("ROLLBACK")
            raise DataError(
                f"cannot load {source.name} into {dataset}: {str(exc).splitlines()[0]}; "
                "nothing was changed"
            ) from None
        except BaseException:
            con.execute("ROLLBACK")
            raise
    log.info("dataset %s: %s from %s, now %d rows", dataset, mode, source, info.rows)
    return info


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
    con: duckdb.DuckDBPyConnection,
    dataset: str,
    description: str | None,
    source: Path,
    mode: str,
) -> DatasetInfo:
    rows = con.execute(f"SELECT count(*) FROM datasets.{quote_identifier(dataset)}").fetchone()
    old = con.execute(
        "SELECT description FROM _connector.datasets WHERE name = ?", [dataset]
    ).fetchone()
    text = description if description is not None else (old[0] if old else "")
    columns = _columns_of(con, dataset)
    now = dt.datetime.now(dt.UTC)
    con.execute(
        "INSERT OR REPLACE INTO _connector.datasets VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            dataset,
            text,
            rows[0] if rows else 0,
            json.dumps([[c.name, c.type] for c in columns]),
            source.name,
            mode,
            now,
        ],
    )
    return DatasetInfo(dataset, text, int(rows[0]) if rows else 0, columns, now)


def read_metadata(con: duckdb.DuckDBPyConnection) -> dict[str, DatasetInfo]:
    rows = con.execute(
        "SELECT name, description, rows, columns_json, ingested_at FROM _connector.datasets "
        "ORDER BY name"
    ).fetchall()
    return {
        name: DatasetInfo(
            name, desc, int(count), tuple(ColumnInfo(n, t) for n, t in json.loads(cols)), when
        )
        for name, desc, count, cols, when in rows
    }


def list_datasets(db_path: Path) -> list[DatasetInfo]:
    """The datasets in a member database (opened read-only)."""
    if not db_path.exists():
        raise StoreError(f"{db_path} does not exist: run `connector init` first")
    try:
        con = duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error as exc:
        raise busy_or_error(exc, db_path) from None
    with con:
        try:
            return list(read_metadata(con).values())
        except duckdb.CatalogException:
            return []
