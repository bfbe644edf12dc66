"""Turn a policy decision into the relations a query actually runs on.

Each granted dataset becomes a per-request relation under the dataset's name with only the
granted columns, in the dataset's own column order; the peer's SQL names it, never the
stored table. A plain grant is a view of the stored table. A shaped grant (masks, row
filters, aggregate-only) is a shaped copy the sandbox builds once: masked values and
filtered-out rows are not in it, so no query over it can reach them.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

from connector.aggregates import is_measurement_type
from connector.column_names import RESERVED
from connector.errors import PermissionDenied
from connector.policy.answers import GrantShape
from connector.shaping import Shaping, mask_description, mask_sql
from connector.sqltext import quote_identifier
from connector.store import ColumnInfo, DatasetInfo

log = logging.getLogger(__name__)

MASKED_TYPE = {"hash": "VARCHAR", "redact": "VARCHAR"}
INTEGER_TYPES = frozenset(
    "TINYINT SMALLINT INTEGER BIGINT HUGEINT UTINYINT USMALLINT UINTEGER UBIGINT UHUGEINT".split()
)
FRACTIONAL_TYPES = frozenset({"FLOAT", "DOUBLE", "DECIMAL"})
CLAMPED_FRACTION_TYPE = "DOUBLE"  # clamped FLOAT and DECIMAL columns: bounds stay exact


class DecisionLike(Protocol):
    """What enforcement needs of a policy decision."""

    @property
    def grants(self) -> Iterable[GrantShape]: ...


class ShapedPolicy(Protocol):
    """What enforcement needs of a usage policy."""

    @property
    def shaping(self) -> Shaping: ...


@dataclass(frozen=True)
class Relation:
    """What a query sees under a dataset's name: its columns, how they are shaped, its SQL.

    `sql` may hold the connector's mask key: it is run, never shown; `description` is shown.
    """

    dataset: str
    columns: tuple[ColumnInfo, ...]
    sql: str
    description: str
    shaping: Shaping = field(default_factory=Shaping)
    version: int = 0  # the dataset's version the relation reads
    since: int = 0  # not 0: only the rows appended after this version (a shaped copy)

    @property
    def column_names(self) -> tuple[str, ...]:
        """The names of the columns a query may read."""
        return tuple(c.name for c in self.columns)

    @property
    def min_group_size(self) -> int:
        """K when only aggregates over groups of at least K rows may leave (else 0)."""
        return self.shaping.min_group_size

    @cached_property  # read several times per query; hashing the SQL once is enough
    def shaped_table(self) -> str:
        """The name of the shaped copy ('' when the relation is a plain view)."""
        if self.shaping.is_plain and not self.since:
            return ""
        # The version is in the name: a copy built from older data is never asked for again.
        text = f"{self.version}\n{self.sql}"
        return "s_" + hashlib.sha256(text.encode()).hexdigest()[:32]

    @property
    def clamps(self) -> Mapping[str, tuple[int | float, int | float]]:
        """Column -> the [low, high] its values are clamped to in the shaped copy (the
        policy's noise bounds, narrowed to whole numbers on integer columns)."""
        return clamps_of(self.shaping, {c.name: c.type for c in self.columns})

    @property
    def measurement_columns(self) -> frozenset[str]:
        """Unmasked columns of measurement types, the only ones min and max may read."""
        masked = self.shaping.mask_of
        return frozenset(
            c.name for c in self.columns if c.name not in masked and is_measurement_type(c.type)
        )


def shaping_of(grant: GrantShape, policies: Mapping[str, ShapedPolicy]) -> Shaping:
    """The one shaping every policy behind grant puts on its dataset; denies when they differ."""
    # Compared as the policy library compares them: by canonical text, not object equality.
    found = {
        policies[i].shaping.canonical(): policies[i].shaping
        for i, _ in grant.policies
        if i in policies
    }
    if len(found) != 1:
        # The policy library refuses this already; a grant is never widened here.
        raise PermissionDenied(
            [f"the policies granting dataset {grant.dataset} shape it differently; ask the owner"]
        )
    return next(iter(found.values()))


@dataclass(frozen=True)
class RowRange:
    """The rows an append-only dataset gained after version `since`: rowids [start, end)."""

    since: int
    start: int
    end: int


def relations_for(
    decision: DecisionLike,
    datasets: Mapping[str, DatasetInfo],
    policies: Mapping[str, ShapedPolicy],
    mask_key: bytes,
    row_ranges: Mapping[str, RowRange] | None = None,
) -> tuple[Relation, ...]:
    """The relations for every granted dataset that holds data, with only granted columns
    (and only the rows of its row range, when one is given)."""
    relations = []
    for grant in decision.grants:
        info = datasets.get(grant.dataset)
        if info is not None:
            shaping = shaping_of(grant, policies)
            rows = (row_ranges or {}).get(grant.dataset)
            relations.append(relation_for(info, set(grant.columns), shaping, mask_key, rows))
    return tuple(relations)


def _check_incremental(info: DatasetInfo, shaping: Shaping) -> None:
    if shaping.min_group_size and shaping.noise is None:
        # Rows since N-1 and since N both pass the minimum group size, but their difference
        # is exactly what version N appended, one row perhaps. Noise bounds what differencing
        # learns; exact aggregates over version ranges do not.
        raise PermissionDenied(
            [
                f"dataset {info.name} is aggregate-only without noise, so it is not read by "
                "version (since_version): two such reads would tell the rows of one version "
                "apart; read it whole"
            ]
        )
    if any(c.name.lower() in RESERVED for c in info.columns):
        raise PermissionDenied(
            [
                f"dataset {info.name} has a column named rowid (loaded before that name was "
                "reserved), so its rows cannot be selected by version; read it whole"
            ]
        )


def visible_columns(
    info: DatasetInfo, granted: set[str], shaping: Shaping
) -> tuple[ColumnInfo, ...]:
    """The granted columns of a dataset in its own order, typed as the peer sees them."""
    masks = shaping.mask_of
    bounded = shaping.noise.bounds_of if shaping.noise else {}
    return tuple(
        ColumnInfo(c.name, MASKED_TYPE.get(masks.get(c.name, ""), _clamped_type(c, bounded)))
        for c in info.columns
        if c.name in granted
    )


def _base_type(type_name: str) -> str:
    return type_name.split("(", maxsplit=1)[0]


def _clamped_type(column: ColumnInfo, bounded: Mapping[str, object]) -> str:
    if column.name in bounded and _base_type(column.type) in FRACTIONAL_TYPES:
        return CLAMPED_FRACTION_TYPE
    return column.type


def clamps_of(
    shaping: Shaping, types: Mapping[str, str]
) -> dict[str, tuple[int | float, int | float]]:
    """The noise bounds of the columns present, as the shaped copy applies them: whole
    numbers inside [low, high] on integer columns (so the clamp never rounds outwards)."""
    if shaping.noise is None:
        return {}
    clamps: dict[str, tuple[int | float, int | float]] = {}
    for column, low, high in shaping.noise.bounds:
        if column not in types:
            continue
        if _base_type(types[column]) in INTEGER_TYPES:
            clamps[column] = (math.ceil(low), math.floor(high))
        else:
            clamps[column] = (float(low), float(high))
    return clamps


def _check_bounded_columns(info: DatasetInfo, shaping: Shaping) -> None:
    """PermissionDenied when a noise bound names a column that is not a number column, or
    an integer column with no whole number inside its bounds."""
    types = {c.name: _base_type(c.type) for c in info.columns}
    clamps = clamps_of(shaping, types)
    for column, _, _ in shaping.noise.bounds if shaping.noise else ():
        kind = types.get(column)
        if kind not in INTEGER_TYPES | FRACTIONAL_TYPES or clamps[column][0] > clamps[column][1]:
            raise PermissionDenied(
                [
                    f"the policy for dataset {info.name} bounds column {column} for noise, "
                    "which is not a number column with a whole number inside its bounds; ask "
                    "the owner to fix the policy"
                ]
            )


def _clamp_sql(column: ColumnInfo, low: float, high: float) -> str:
    """The column clamped to [low, high] under its own name; NULL stays NULL (DuckDB's
    greatest/least skip NULL arguments, so a bare clamp would turn NULL into high)."""
    name = quote_identifier(column.name)
    target = column.type if _base_type(column.type) in INTEGER_TYPES else CLAMPED_FRACTION_TYPE
    return (
        f"CAST(CASE WHEN {name} IS NULL THEN NULL ELSE greatest({low!r}, least({high!r}, "
        f"{name})) END AS {target}) AS {name}"
    )


def relation_for(
    info: DatasetInfo,
    granted: set[str],
    shaping: Shaping,
    mask_key: bytes,
    rows: RowRange | None = None,
) -> Relation:
    """The relation one dataset becomes under a grant of these columns with this shaping
    (only the rows in rows, when given: every term of the shaping applies to them alike)."""
    missing = granted - {c.name for c in info.columns}
    if missing:
        log.warning(
            "policy grants columns %s of %s, which it does not have",
            ", ".join(sorted(missing)),
            info.name,
        )
    types = {c.name: c.type for c in info.columns}
    unknown = [f.column for f in shaping.filters if f.column not in types]
    if unknown:
        raise PermissionDenied(
            [
                f"the policy for dataset {info.name} filters rows on column "
                f"{', '.join(unknown)}, which the dataset does not have; ask the owner to fix "
                "the policy"
            ]
        )
    _check_bounded_columns(info, shaping)
    clamps = clamps_of(shaping, types)
    masks = shaping.mask_of
    shown = [c for c in info.columns if c.name in granted]
    run, described = [], []
    for column in shown:
        kind = masks.get(column.name)
        if column.name in clamps:
            low, high = clamps[column.name]
            run.append(_clamp_sql(column, low, high))
            described.append(f"greatest({low!r}, least({high!r}, {column.name})) AS {column.name}")
        elif kind is None:
            run.append(quote_identifier(column.name))
            described.append(column.name)
        else:
            run.append(mask_sql(column.name, kind, column.type, mask_key))
            described.append(mask_description(column.name, kind))
    where = shaping.where_sql()
    condition = f" WHERE {where}" if where else ""
    described_where = condition
    if rows is not None:
        _check_incremental(info, shaping)
        # Datasets are only appended to or replaced, so a row's rowid is its position.
        span = f"rowid >= {int(rows.start)} AND rowid < {int(rows.end)}"
        condition = f" WHERE {span}" + (f" AND ({where})" if where else "")
        since = f"<rows added after version {int(rows.since)}>"
        described_where = f" WHERE {since}" + (f" AND ({where})" if where else "")
    table = f"datasets.{quote_identifier(info.name)}"
    return Relation(
        dataset=info.name,
        columns=visible_columns(info, granted, shaping),
        sql=f"SELECT {', '.join(run)} FROM {table}{condition}",
        description=f"SELECT {', '.join(described)} FROM {info.name}{described_where}",
        shaping=shaping,
        version=info.version,
        since=rows.since if rows is not None else 0,
    )
