"""Loading a file into the member's DuckDB file: one transaction, all rows or none, each
load a new version of its dataset (recorded with the file's sha256)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import pyarrow as pa

from connector.errors import AlreadyLoaded, DataError, first_line
from connector.names import DATASET_NAME
from connector.sqltext import quote_identifier
from connector.staging import StagedFile
from connector.store import (
    ColumnInfo,
    DatasetInfo,
    columns_of,
    open_writable,
    prepare_metadata,
)

log = logging.getLogger(__name__)


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
    with _staged(request) as staged, open_writable(db_path) as con:
        prepare_metadata(con)
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
        existing = columns_of(con, dataset)
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
    columns = columns_of(con, dataset)
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
