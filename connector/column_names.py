"""Column names a dataset may have: plain SQL names, the same in the data, in policies and
in peers' queries.

Files often carry headers such as `plant name`, `défauts (n°)` or `Größe`. Such a name could
be ingested, but every policy, filter, mask and query would then have to quote it exactly,
and internal names of the connector must never collide with a data column. Ingest therefore
refuses them and says what they would become; `--normalise-names` loads them under those
plain names (`plant_name`, `defauts_n`, `grosse`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from connector.errors import DataError
from connector.names import COLUMN_NAME

_NOT_NAME = re.compile(r"[^a-z0-9_]+")
# DuckDB's own name for a row's number: a column of that name would hide it from the SQL the
# connector writes (an incremental read selects rows by it).
RESERVED = frozenset({"rowid"})


def plain_name(header: str) -> str:
    """header as a plain SQL name: ASCII letters, digits and _, lower-case."""
    folded = unicodedata.normalize("NFKD", header.casefold())
    ascii_only = folded.encode("ascii", "ignore").decode("ascii")
    name = _NOT_NAME.sub("_", ascii_only).strip("_")[:63] or "column"
    if name in RESERVED:
        return f"{name}_"
    return name if name[0].isalpha() or name[0] == "_" else f"c_{name}"[:63]


def dataset_columns(headers: Sequence[str], *, normalise: bool) -> list[str]:
    """The column names headers are loaded as; DataError names the headers that are not
    plain names (unless normalise) and any two that become the same name."""
    lowered = [h.lower() if h.isascii() else h for h in headers]
    wrong = [
        h
        for h, low in zip(headers, lowered, strict=True)
        if not COLUMN_NAME.fullmatch(low) or low in RESERVED
    ]
    reserved = [h for h, low in zip(headers, lowered, strict=True) if low in RESERVED]
    if reserved and not normalise:
        raise DataError(
            f"a column may not be named {reserved[0]!r}: DuckDB keeps that name for each row's "
            "number, which incremental reads rely on; rename it in the file, or pass "
            f"--normalise-names to load it as {plain_name(reserved[0])}; nothing was loaded"
        )
    if wrong and not normalise:
        shown = ", ".join(f"{h!r} -> {plain_name(h)}" for h in wrong[:10])
        raise DataError(
            f"column names must be plain SQL names (letters, digits and _) so that policies "
            f"and queries can name them; the file has {shown}; pass --normalise-names to load "
            "them under those names, or rename them in the file; nothing was loaded"
        )
    names = [plain_name(h) if h in wrong else low for h, low in zip(headers, lowered, strict=True)]
    seen: dict[str, str] = {}
    for header, name in zip(headers, names, strict=True):
        if name in seen:
            raise DataError(
                f"columns {seen[name]!r} and {header!r} would both be named {name}; rename one "
                "in the file; nothing was loaded"
            )
        seen[name] = header
    return names
