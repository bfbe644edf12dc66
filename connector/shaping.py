"""How a policy shapes a dataset: column masks, row filters and the aggregate-only term.

A `Shaping` is part of a usage policy. It renders to the SQL that builds the shaped copy of
a dataset (masks applied, rows filtered) and to a description a peer or legal team can read.
Values from policy files reach SQL only as typed literals rendered here.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from connector.canonical import canonical_json
from connector.errors import ConfigError
from connector.sqltext import SqlValue, quote_identifier, sql_literal

MaskKind = Literal["hash", "redact", "null"]
MASK_KINDS: tuple[MaskKind, ...] = ("hash", "redact", "null")
REDACTED = "REDACTED"
RANGE_OPERATORS = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<"}
MASK_KEY_BYTES = 32
HMAC_BLOCK = 64  # SHA-256's block size

FilterValue = SqlValue


@dataclass(frozen=True)
class RowFilter:
    """One column's condition: membership in values, or bounds such as (("gte", 10),)."""

    column: str
    values: tuple[FilterValue, ...] = ()
    bounds: tuple[tuple[str, FilterValue], ...] = ()

    def sql(self) -> str:
        """The condition as SQL over the dataset's own column."""
        column = quote_identifier(self.column)
        if self.values:
            return f"{column} IN ({', '.join(sql_literal(v) for v in self.values)})"
        return " AND ".join(
            f"{column} {RANGE_OPERATORS[op]} {sql_literal(v)}" for op, v in self.bounds
        )


@dataclass(frozen=True)
class Noise:
    """Differential privacy on an aggregate-only dataset: the epsilon one query spends, the
    epsilon a member may spend a day, and the [low, high] each summed column is clamped to."""

    epsilon: float
    epsilon_per_day: float
    bounds: tuple[tuple[str, float, float], ...] = ()

    @property
    def bounds_of(self) -> Mapping[str, tuple[float, float]]:
        """Column -> (low, high)."""
        return {column: (low, high) for column, low, high in self.bounds}

    def as_json(self) -> dict[str, object]:
        """The terms as plain JSON values (for canonical texts and tools)."""
        return {
            "epsilon": self.epsilon,
            "epsilon_per_day": self.epsilon_per_day,
            "bounds": {column: [low, high] for column, low, high in sorted(self.bounds)},
        }

    def describe(self) -> str:
        """The terms as a legal team or a peer reads them."""
        bounds = ", ".join(f"{c} in [{_number(lo)}, {_number(hi)}]" for c, lo, hi in self.bounds)
        return (
            f"noise: epsilon {_number(self.epsilon)} a query, {_number(self.epsilon_per_day)} a "
            f"day per member; sums clamped to {bounds or '(no column may be summed)'}"
        )


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Shaping:
    """Masks, row filters and the aggregate-only terms one policy puts on its datasets."""

    masks: tuple[tuple[str, MaskKind], ...] = ()
    filters: tuple[RowFilter, ...] = ()
    min_group_size: int = 0  # 0: rows may leave; K: only aggregates over >= K rows
    noise: Noise | None = None  # aggregate-only answers carry calibrated noise
    group_by: tuple[tuple[str, ...], ...] = ()  # the only GROUP BY sets allowed (): any

    @property
    def is_plain(self) -> bool:
        """True when the dataset is shown as stored (granted columns only)."""
        return not (self.masks or self.filters or self.min_group_size)

    @property
    def mask_of(self) -> Mapping[str, MaskKind]:
        """Column -> mask kind."""
        return dict(self.masks)

    def where_sql(self) -> str:
        """The row filter as one SQL condition (empty when every row is shown)."""
        return " AND ".join(f"({f.sql()})" for f in self.filters)

    def canonical(self) -> str:
        """A stable text of the shaping: equal texts mean equal shaping."""
        terms: dict[str, object] = {
            "masks": sorted(self.masks),
            "where": sorted(f.sql() for f in self.filters),
            "min_group_size": self.min_group_size,
        }
        # Only when set, so the text of a policy without them is as it always was.
        if self.noise:
            terms["noise"] = self.noise.as_json()
        if self.group_by:
            terms["group_by"] = sorted(sorted(columns) for columns in self.group_by)
        return canonical_json(terms)


def mask_sql(column: str, kind: MaskKind, column_type: str, key: bytes) -> str:
    """The SQL expression that shows column masked (named like the column)."""
    name = quote_identifier(column)
    if kind == "hash":
        return f"{hmac_sql(f'CAST({name} AS VARCHAR)', key)} AS {name}"
    if kind == "redact":
        return f"'{REDACTED}' AS {name}"
    return f"CAST(NULL AS {column_type}) AS {name}"


def hmac_sql(text_expression: str, key: bytes) -> str:
    """HMAC-SHA-256 (RFC 2104) of a VARCHAR expression's UTF-8 bytes, as lower-case hex.

    NULL stays NULL. Equal to Python's hmac.new(key, text.encode(), sha256).hexdigest().
    """
    block = (hashlib.sha256(key).digest() if len(key) > HMAC_BLOCK else key).ljust(
        HMAC_BLOCK, b"\0"
    )
    inner = bytes(b ^ 0x36 for b in block).hex()
    outer = bytes(b ^ 0x5C for b in block).hex()
    return (
        f"sha256(unhex('{outer}') || unhex(sha256(unhex('{inner}') || encode({text_expression}))))"
    )


def mask_description(column: str, kind: MaskKind) -> str:
    """How a mask reads in Explain: never the key."""
    if kind == "hash":
        return f"hmac_sha256(<connector mask key>, {column}) AS {column}"
    if kind == "redact":
        return f"'{REDACTED}' AS {column}"
    return f"NULL AS {column}"


def load_mask_key(path: Path) -> bytes:
    """The connector's secret mask key (created, readable only by its owner, when missing)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first: read that one
        else:
            with os.fdopen(descriptor, "w", encoding="ascii") as handle:
                handle.write(secrets.token_hex(MASK_KEY_BYTES) + "\n")
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError):
        raise ConfigError(
            f"cannot read the mask key {path}: it must hold {MASK_KEY_BYTES * 2} hex digits; "
            "restore it from backup (a new key changes every hashed value peers hold)"
        ) from None
    if len(key) < MASK_KEY_BYTES:
        raise ConfigError(
            f"the mask key {path} is shorter than {MASK_KEY_BYTES} bytes; restore it from backup"
        )
    return key
