"""Strict CSV: the dialect of a file, and a check of its structure before DuckDB reads it.

DuckDB's reader is forgiving: a file whose lines have 3, 2 and 4 fields and an unclosed
quote loads as one text column. The owner must learn that its export is broken, with the
line, before anything is shared: every record must have as many fields as the header, and
every quote must close. The dialect is detected from the header line, or given with
`--csv-option` (delimiter, quote, escape, encoding), and the same dialect is handed to DuckDB.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from connector.errors import DataError
from connector.sqltext import sql_string

DELIMITERS = (",", ";", "\t", "|")
OPTIONS = ("delimiter", "quote", "escape", "encoding")
NAMED = {"tab": "\t", "comma": ",", "semicolon": ";", "pipe": "|"}


@dataclass(frozen=True)
class CsvDialect:
    """How a CSV file is written; the same reading for the check and for DuckDB."""

    delimiter: str = ","
    quote: str = '"'
    escape: str = '"'  # '"' means a quote inside quotes is doubled
    encoding: str = "utf-8"

    def reader_options(self) -> str:
        """The options of DuckDB's read_csv for this dialect (types are still detected)."""
        return (
            f"delim = {sql_string(self.delimiter)}, quote = {sql_string(self.quote)}, "
            f"escape = {sql_string(self.escape)}, header = true, strict_mode = true, "
            f"null_padding = false, encoding = {sql_string(self.encoding)}"
        )


def dialect_from(options: Mapping[str, str], source: Path) -> CsvDialect:
    """The dialect given by --csv-option KEY=VALUE, the delimiter detected when not given."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise DataError(f"unknown --csv-option {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    values = {key: NAMED.get(value, value) for key, value in options.items()}
    for key in ("delimiter", "quote", "escape"):
        if key in values and len(values[key]) != 1:
            raise DataError(f"--csv-option {key} must be one character (or tab, comma, ...)")
    encoding = values.get("encoding", "utf-8")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"--csv-option encoding={encoding} is not an encoding") from None
    quote = values.get("quote", '"')
    delimiter = values.get("delimiter") or _detect_delimiter(source, encoding, quote)
    return CsvDialect(delimiter, quote, values.get("escape", quote), encoding)


def _detect_delimiter(source: Path, encoding: str, quote: str) -> str:
    header = _first_line(source, encoding)
    counts = {d: _count_outside_quotes(header, d, quote) for d in DELIMITERS}
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ","


def _first_line(source: Path, encoding: str) -> str:
    try:
        with source.open(encoding=encoding, newline="") as handle:
            return handle.readline()
    except UnicodeDecodeError:
        raise DataError(
            f"{source.name} is not {encoding} text; pass --csv-option encoding=NAME "
            "(for example latin-1)"
        ) from None


def _count_outside_quotes(line: str, delimiter: str, quote: str) -> int:
    count, quoted = 0, False
    for char in line:
        if char == quote:
            quoted = not quoted
        elif char == delimiter and not quoted:
            count += 1
    return count


def check_structure(source: Path, dialect: CsvDialect) -> None:
    """DataError naming the line of the first record whose field count differs from the
    header's, of an unclosed quote, or of text that is not in the file's encoding."""
    doubled = dialect.escape == dialect.quote
    try:
        with source.open(encoding=dialect.encoding, newline="") as handle:
            reader = csv.reader(
                handle,
                delimiter=dialect.delimiter,
                quotechar=dialect.quote,
                doublequote=doubled,
                escapechar=None if doubled else dialect.escape,
                strict=True,
            )
            try:
                width = len(next(reader))
                for record in reader:
                    if record and len(record) != width:
                        raise DataError(
                            f"{source.name}, line {reader.line_num}: {len(record)} fields, but "
                            f"the header has {width} (delimiter {dialect.delimiter!r}); fix the "
                            "file, or pass --csv-option delimiter=... if it uses another one; "
                            "nothing was loaded"
                        )
            except StopIteration:
                raise DataError(f"{source.name} is empty: a CSV file needs a header line") from None
            except csv.Error as exc:
                raise DataError(
                    f"{source.name}, line {reader.line_num}: {exc} (a quote that is never "
                    "closed?); fix the file; nothing was loaded"
                ) from None
    except UnicodeDecodeError:
        raise DataError(
            f"{source.name} is not {dialect.encoding} text; pass --csv-option encoding=NAME"
        ) from None
