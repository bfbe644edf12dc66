"""A query result written as a peer asks (table, csv, json, parquet, arrow), and checked
later against the exact Arrow bytes its receipt signs.

A receipt's digest covers the Arrow IPC bytes as received. A result saved in another
format is kept beside those bytes (`FILE.arrow`), and `connector receipt verify` checks
both: the bytes against the receipt, then the file against the bytes (CSV and JSON by
writing them again, Parquet by reading it back).
"""

from __future__ import annotations

import datetime as dt
import decimal
import io
import json
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from connector.safetext import escaped

FORMATS = ("table", "csv", "json", "parquet", "arrow")
TEXT_FORMATS = ("table", "csv", "json")
ARROW_SUFFIX = ".arrow"


def write_text(table: pa.Table, fmt: str, out: IO[str]) -> None:
    """table as text: an aligned table, CSV with a header, or one JSON object per line."""
    if fmt == "csv":
        sink = pa.BufferOutputStream()
        pa_csv.write_csv(table, sink)
        out.write(sink.getvalue().to_pybytes().decode())
    elif fmt == "json":
        for row in table.to_pylist():
            out.write(json.dumps(row, default=_json_value, ensure_ascii=False) + "\n")
    else:
        out.write(_aligned(table))


def _json_value(value: Any) -> Any:
    """Numbers stay numbers (Decimal included); dates and times in ISO 8601; bytes in hex."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.date | dt.datetime | dt.time):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _aligned(table: pa.Table) -> str:
    # Names and values come from the provider: escaped, so they cannot drive the terminal.
    rows = [[("" if v is None else escaped(v)) for v in row.values()] for row in table.to_pylist()]
    header = [escaped(name) for name in table.column_names]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines) + "\n"


def arrow_copy(path: Path) -> Path:
    """Where the exact Arrow bytes of a result saved in another format are kept."""
    return path.with_name(path.name + ARROW_SUFFIX)


def save(table: pa.Table, arrow_ipc: bytes, fmt: str, path: Path) -> Path | None:
    """Write the result to path in fmt; returns the path of the Arrow copy kept beside it
    (None when fmt is arrow: the file is the exact bytes)."""
    if fmt == "arrow":
        path.write_bytes(arrow_ipc)
        return None
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        with path.open("w", encoding="utf-8", newline="") as out:
            write_text(table, fmt, out)
    copy = arrow_copy(path)
    copy.write_bytes(arrow_ipc)
    return copy


def matches(path: Path, fmt: str, table: pa.Table) -> bool:
    """True when the file at path holds exactly table, written in fmt."""
    if fmt == "parquet":
        try:
            return bool(pq.read_table(path).equals(table, check_metadata=False))
        except (pa.ArrowException, OSError):
            return False
    buffer = io.StringIO()
    write_text(table, fmt, buffer)
    try:
        return path.read_text(encoding="utf-8") == buffer.getvalue()
    except (OSError, UnicodeDecodeError):
        return False
