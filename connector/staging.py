"""Reading a source file (CSV, Parquet, JSON) for ingest, apart from the member's database.

The file is read by an in-memory DuckDB database apart from the member's and handed over
as an Arrow stream, so the same code loads it into the member's file whether the CLI opens
the file itself or the running server (whose DuckDB instance is locked down and reads no
files) does. A CSV file is checked strictly first (csv_strict.py).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import duckdb
import pyarrow as pa

from connector.column_names import dataset_columns
from connector.csv_strict import check_structure, dialect_from
from connector.errors import DataError, first_line
from connector.sqltext import sql_string

FORMATS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".json": "json",
    ".ndjson": "json",
    ".jsonl": "json",
}
_READERS = {"csv": "read_csv", "parquet": "read_parquet", "json": "read_json_auto"}
BATCH_ROWS = 65_536


@functools.cache
def _reader_database() -> duckdb.DuckDBPyConnection:
    """The process's in-memory database for reading source files.

    Opening a DuckDB database costs about 25 ms of CPU (its function catalog is built each
    time), half of a small ingest. Reading a file leaves nothing in that database, so
    every staged file shares it and reads through a connection of its own. (Two threads
    staging the very first files at once may each open one: harmless.)
    """
    # Lossless: UUID, JSON and other DuckDB types cross as Arrow extension types and
    # arrive as they were read, not as text. No file cache: nothing read stays behind.
    config: dict[str, str | bool | int | float | list[str]] = {
        "threads": 2,
        "arrow_lossless_conversion": True,
        "enable_external_file_cache": False,
    }
    return duckdb.connect(":memory:", config=config)


def file_format(source: Path, requested: str | None) -> str:
    """The format to read source as: the one requested, else its suffix's."""
    fmt = requested or FORMATS.get(source.suffix.lower())
    if fmt not in _READERS:
        raise DataError(
            f"cannot tell the format of {source.name}: use a .csv, .parquet or .json file, "
            "or pass --format csv|parquet|json"
        )
    return fmt


class StagedFile:
    """A source file opened for reading: its column names as read, the names they get in
    the dataset, and its rows as an Arrow stream (read once)."""

    def __init__(
        self,
        source: Path,
        *,
        requested_format: str | None = None,
        csv_options: Mapping[str, str] | None = None,
        normalise_names: bool = False,
    ) -> None:
        if not source.is_file():
            raise DataError(f"{source} does not exist or is not a file")
        fmt = file_format(source, requested_format)
        options = ""
        if fmt == "csv":
            dialect = dialect_from(csv_options or {}, source)
            check_structure(source, dialect)
            options = ", " + dialect.reader_options()
        elif csv_options:
            raise DataError("--csv-option applies to CSV files only")
        self.source = source
        self._con = _reader_database().cursor()
        try:
            literal = sql_string(str(source))
            self._relation = self._con.sql(f"SELECT * FROM {_READERS[fmt]}({literal}{options})")  # noqa: S608
            # DuckDB's readers already rename names that collide case-insensitively.
            self.names: list[str] = [str(c) for c in self._relation.columns]
        except duckdb.Error as exc:
            self._con.close()
            raise DataError(f"cannot read {source}: {first_line(exc)}") from None
        try:
            self.columns = dataset_columns(self.names, normalise=normalise_names)
        except BaseException:
            self._con.close()
            raise

    def reader(self) -> pa.RecordBatchReader:
        """The file's rows, batch by batch (memory bounded by the batch size)."""
        try:
            return self._relation.to_arrow_reader(BATCH_ROWS)
        except duckdb.Error as exc:
            raise DataError(f"cannot read {self.source}: {first_line(exc)}") from None

    def close(self) -> None:
        """Close this file's connection."""
        self._con.close()

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
