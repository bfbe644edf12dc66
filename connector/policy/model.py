"""The usage-policy file format: parse, validate, normalise. Policy files are hostile input.

Every error names the file and the line. Unknown keys are refused: a term this version
would accept but not enforce would share more than legal intended.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from connector.errors import PolicyError
from connector.shaping import (
    MASK_KINDS,
    RANGE_OPERATORS,
    FilterValue,
    MaskKind,
    RowFilter,
    Shaping,
)

POLICY_FORMAT = 1
MAX_POLICY_BYTES = 1024 * 1024
POLICY_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Dataset names as the store accepts them (no leading "_": the store's own schemas use it).
DATASET = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MEMBER_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ANY_TEXT = re.compile(r"^[^\x00-\x08\x0b-\x1f\x7f]{1,2000}$")
PURPOSE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._:/-]{0,127}$")

# key -> nested keys (None: a leaf). The only keys this connector version enforces.
SCHEMA: dict[str, dict[str, None] | None] = {
    "format": None,
    "id": None,
    "version": None,
    "description": None,
    "datasets": None,
    "grantees": {"members": None},
    "purposes": None,
    "valid": {"from": None, "until": None},
    "columns": {"allow": None, "mask": None},
    "rows": {"where": None},
    "aggregate_only": {"min_group_size": None},
    "obligations": {"delete_within_days": None, "attribution": None, "terms": None},
    "limits": {
        "max_rows_per_query": None,
        "queries_per_day": None,
        "rows_per_day": None,
        "max_bytes_per_query": None,
        "bytes_per_day": None,
    },
}
REQUIRED = ("id", "version", "description", "datasets", "grantees", "purposes", "valid", "columns")
MAX_FILTER_VALUES = 1000


@dataclass(frozen=True)
class Obligations:
    """What the peer takes on by receiving data; sent with every answer, not enforced here."""

    delete_within_days: int = 0  # 0: no deletion deadline
    attribution: str = ""
    terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    """How much a grantee may take (0: no limit of this kind); bytes are Arrow IPC bytes sent."""

    max_rows_per_query: int = 0
    queries_per_day: int = 0
    rows_per_day: int = 0
    max_bytes_per_query: int = 0
    bytes_per_day: int = 0

    @classmethod
    def tightest(cls, limits: Iterable[Limits]) -> Limits:
        """Each kind of limit at its tightest over several policies (0 where none sets it)."""
        every = list(limits)
        return cls(
            max_rows_per_query=tightest(lim.max_rows_per_query for lim in every),
            queries_per_day=tightest(lim.queries_per_day for lim in every),
            rows_per_day=tightest(lim.rows_per_day for lim in every),
            max_bytes_per_query=tightest(lim.max_bytes_per_query for lim in every),
            bytes_per_day=tightest(lim.bytes_per_day for lim in every),
        )

    @property
    def limits_rows(self) -> bool:
        """True when a row limit applies (rows packed into one row would bypass it)."""
        return bool(self.max_rows_per_query or self.rows_per_day)


def tightest(limits: Iterable[int]) -> int:
    """The smallest positive limit (0 when none is set)."""
    return min((n for n in limits if n > 0), default=0)


@dataclass(frozen=True)
class UsagePolicy:
    """A validated usage policy, identifiers lower-cased, times in UTC."""

    id: str
    version: int
    description: str
    datasets: tuple[str, ...]
    members: tuple[str, ...]
    purposes: tuple[str, ...]
    valid_from: dt.datetime
    valid_until: dt.datetime
    columns_allow: tuple[str, ...]
    path: Path
    sha256: str
    obligations: Obligations = Obligations()
    limits: Limits = Limits()
    shaping: Shaping = field(default_factory=Shaping)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the policy shows, in the clear or masked."""
        return self.columns_allow + tuple(c for c, _ in self.shaping.masks)

    def as_rego_data(self) -> dict[str, Any]:
        """The policy as the Rego library reads it (JSON-able)."""
        return {
            "id": self.id,
            "version": self.version,
            "datasets": list(self.datasets),
            "members": list(self.members),
            "purposes": list(self.purposes),
            "valid_from_ns": _ns(self.valid_from),
            "valid_until_ns": _ns(self.valid_until),
            "valid_from": self.valid_from.isoformat(),
            "valid_until": self.valid_until.isoformat(),
            "columns": list(self.columns),
            "shaping": self.shaping.canonical(),
            "delete_within_days": self.obligations.delete_within_days,
            "attribution": self.obligations.attribution,
            "terms": list(self.obligations.terms),
        }


def _ns(moment: dt.datetime) -> int:
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


class _Reader:
    """Walks the composed YAML nodes of one file, keeping line numbers for every message."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, node: yaml.Node | None, message: str) -> PolicyError:
        line = node.start_mark.line + 1 if node is not None else None
        return PolicyError(message, path=str(self.path), line=line)

    def mapping(self, node: yaml.Node, where: str, allowed: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{where} must be a mapping of keys to values")
        found: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise self.fail(key_node, f"{where} has a key that is not a plain name")
            if key in found:
                raise self.fail(key_node, f"key '{key}' appears twice in {where}")
            if key not in allowed:
                raise self.fail(
                    key_node,
                    f"unknown key '{key}' in {where}; this connector version supports: "
                    f"{', '.join(allowed)}",
                )
            found[key] = (key_node, value_node)
        return found

    def scalar(self, node: yaml.Node, where: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{where} must be a single value")
        try:
            return yaml.SafeLoader("").construct_object(node)
        except yaml.YAMLError:
            raise self.fail(node, f"{where} has a value YAML cannot read safely") from None

    def text(self, node: yaml.Node, where: str, pattern: re.Pattern[str] | None = None) -> str:
        value = self.scalar(node, where)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(node, f"{where} must be non-empty text")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(node, f"{where} {value!r} is not allowed here ({_rule(pattern)})")
        return value

    def text_list(self, node: yaml.Node, where: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, f"{where} must be a non-empty list, like [a, b]")
        values = [self.text(item, f"an entry of {where}", pattern) for item in node.value]
        if len(set(values)) != len(values):
            raise self.fail(node, f"{where} lists an entry twice")
        return tuple(values)

    def moment(self, node: yaml.Node, where: str) -> dt.datetime:
        value = self.scalar(node, where)
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                # RFC 3339: a time without a zone would silently be read as UTC.
                raise self.fail(node, f"{where} needs a time zone, like 2026-01-31T08:00:00Z")
            return value.astimezone(dt.UTC)
        if isinstance(value, dt.date):
            return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
        raise self.fail(node, f"{where} must be a date (2026-01-31) or a date-time with zone")


def _rule(pattern: re.Pattern[str]) -> str:
    return {
        POLICY_ID.pattern: "lower-case letters, digits, '.', '_' and '-'",
        IDENTIFIER.pattern: "a plain SQL name: letters, digits and _",
        DATASET.pattern: "a dataset name: a letter, then letters, digits and _",
        MEMBER_ID.pattern: "a member id: lower-case letters, digits, '.', '_' and '-'",
        PURPOSE.pattern: "letters, digits, spaces and . _ : / -",
        ANY_TEXT.pattern: "text of at most 2000 characters, no control characters",
    }.get(pattern.pattern, pattern.pattern)


def parse_policy(path: Path, text: bytes | None = None) -> UsagePolicy:
    """Parse and validate a policy file; PolicyError names the file, the line and the fix."""
    data = text if text is not None else _read(path)
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"larger than {MAX_POLICY_BYTES} bytes", path=str(path))
    try:
        root = yaml.compose(data.decode("utf-8"), Loader=yaml.SafeLoader)
    except UnicodeDecodeError:
        raise PolicyError("not UTF-8 text", path=str(path)) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"not valid YAML: {problem}", path=str(path), line=line) from None
    reader = _Reader(path)
    if root is None:
        raise PolicyError("the file is empty", path=str(path))
    top = reader.mapping(root, "the policy", SCHEMA)
    missing = [k for k in REQUIRED if k not in top]
    if missing:
        raise reader.fail(root, f"missing key(s): {', '.join(missing)}")
    return _policy(reader, top, path, hashlib.sha256(data).hexdigest())


def _read(path: Path) -> bytes:
    return read_limited(path, MAX_POLICY_BYTES)


def read_limited(path: Path, limit: int) -> bytes:
    """The file's bytes; PolicyError when it cannot be read or is larger than limit bytes."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)  # never more: the file may be huge
    except OSError as exc:
        raise PolicyError(f"cannot read: {exc.strerror}", path=str(path)) from None
    if len(data) > limit:
        raise PolicyError(f"larger than {limit} bytes", path=str(path))
    return data


def _policy(reader: _Reader, top: dict[str, Any], path: Path, sha256: str) -> UsagePolicy:
    if "format" in top:
        node = top["format"][1]
        fmt = reader.scalar(node, "format")
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise reader.fail(node, "format must be a whole number, 1 for this version")
        if fmt > POLICY_FORMAT:
            raise reader.fail(
                node, f"format {fmt} is written for a newer connector; upgrade the connector"
            )
    version_node = top["version"][1]
    version = reader.scalar(version_node, "version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise reader.fail(version_node, "version must be a whole number of at least 1")
    grantees = reader.mapping(top["grantees"][1], "grantees", SCHEMA["grantees"] or {})
    if "members" not in grantees:
        raise reader.fail(top["grantees"][1], "grantees needs members: [member-id, ...]")
    valid = reader.mapping(top["valid"][1], "valid", SCHEMA["valid"] or {})
    for key in ("from", "until"):
        if key not in valid:
            raise reader.fail(top["valid"][1], f"valid needs '{key}'")
    start = reader.moment(valid["from"][1], "valid.from")
    end = reader.moment(valid["until"][1], "valid.until")
    if end <= start:
        raise reader.fail(valid["until"][1], "valid.until must be later than valid.from")
    columns = reader.mapping(top["columns"][1], "columns", SCHEMA["columns"] or {})
    if "allow" not in columns:
        raise reader.fail(top["columns"][1], "columns needs allow: [column, ...]")
    lower = _lowered(reader)
    allow = lower(columns["allow"][1], "columns.allow", IDENTIFIER)
    return UsagePolicy(
        id=reader.text(top["id"][1], "id", POLICY_ID),
        version=version,
        description=reader.text(top["description"][1], "description", ANY_TEXT),
        datasets=lower(top["datasets"][1], "datasets", DATASET),
        members=reader.text_list(grantees["members"][1], "grantees.members", MEMBER_ID),
        purposes=reader.text_list(top["purposes"][1], "purposes", PURPOSE),
        valid_from=start,
        valid_until=end,
        columns_allow=allow,
        path=path,
        sha256=sha256,
        limits=_limits(reader, top["limits"][1]) if "limits" in top else Limits(),
        obligations=_obligations(reader, top["obligations"][1])
        if "obligations" in top
        else Obligations(),
        shaping=Shaping(
            masks=_masks(reader, columns["mask"][1], allow) if "mask" in columns else (),
            filters=_row_filters(reader, top["rows"][1]) if "rows" in top else (),
            min_group_size=_min_group_size(reader, top["aggregate_only"][1])
            if "aggregate_only" in top
            else 0,
        ),
    )


def _column_name(reader: _Reader, node: yaml.Node, where: str) -> str:
    name = reader.text(node, where)
    lowered = name.lower() if name.isascii() else name
    if not IDENTIFIER.fullmatch(lowered):
        raise reader.fail(node, f"{where} {name!r} is not allowed here ({_rule(IDENTIFIER)})")
    return lowered


def _masks(
    reader: _Reader, node: yaml.Node, allow: tuple[str, ...]
) -> tuple[tuple[str, MaskKind], ...]:
    if not isinstance(node, yaml.MappingNode) or not node.value:
        raise reader.fail(node, "columns.mask must map columns to hash, redact or null")
    masks: dict[str, MaskKind] = {}
    for key_node, value_node in node.value:
        column = _column_name(reader, key_node, "a column of columns.mask")
        if column in masks:
            raise reader.fail(key_node, f"column {column} is masked twice in columns.mask")
        if column in allow:
            raise reader.fail(
                key_node,
                f"column {column} is both allowed in the clear and masked; list it in "
                "columns.allow or in columns.mask, not both",
            )
        # The word as written: YAML would read the mask kind null as no value at all.
        kind = value_node.value if isinstance(value_node, yaml.ScalarNode) else None
        if kind not in MASK_KINDS:
            raise reader.fail(
                value_node, f"columns.mask.{column} must be one of {', '.join(MASK_KINDS)}"
            )
        masks[column] = kind
    return tuple(masks.items())


def _row_filters(reader: _Reader, node: yaml.Node) -> tuple[RowFilter, ...]:
    rows = reader.mapping(node, "rows", SCHEMA["rows"] or {})
    if "where" not in rows:
        raise reader.fail(node, "rows needs where: {column: [values]}")
    where = rows["where"][1]
    if not isinstance(where, yaml.MappingNode) or not where.value:
        raise reader.fail(
            where, "rows.where must map columns to [values] or to {gte: X, lt: Y} bounds"
        )
    filters: dict[str, RowFilter] = {}
    for key_node, value_node in where.value:
        column = _column_name(reader, key_node, "a column of rows.where")
        if column in filters:
            raise reader.fail(key_node, f"column {column} appears twice in rows.where")
        filters[column] = _row_filter(reader, column, value_node)
    return tuple(filters.values())


def _row_filter(reader: _Reader, column: str, node: yaml.Node) -> RowFilter:
    where = f"rows.where.{column}"
    if isinstance(node, yaml.SequenceNode):
        if not node.value or len(node.value) > MAX_FILTER_VALUES:
            raise reader.fail(node, f"{where} must list 1 to {MAX_FILTER_VALUES} values")
        values = tuple(_filter_value(reader, item, f"a value of {where}") for item in node.value)
        return RowFilter(column, values=values)
    if isinstance(node, yaml.MappingNode):
        found = reader.mapping(node, where, dict.fromkeys(RANGE_OPERATORS))
        if not found:
            raise reader.fail(node, f"{where} needs a bound: gte, gt, lte or lt")
        if {"gte", "gt"} <= found.keys() or {"lte", "lt"} <= found.keys():
            raise reader.fail(node, f"{where} may have one lower bound and one upper bound")
        bounds = tuple(
            (op, _filter_value(reader, value, f"{where}.{op}")) for op, (_, value) in found.items()
        )
        return RowFilter(column, bounds=bounds)
    raise reader.fail(node, f"{where} must be a list of values or a mapping of bounds")


def _filter_value(reader: _Reader, node: yaml.Node, where: str) -> FilterValue:
    value = reader.scalar(node, where)
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        raise reader.fail(node, f"{where} needs a time zone, like 2026-01-31T08:00:00Z")
    if isinstance(value, float) and not math.isfinite(value):
        raise reader.fail(node, f"{where} must be a finite number")
    if isinstance(value, str) and not ANY_TEXT.fullmatch(value):
        raise reader.fail(node, f"{where} must be text of at most 2000 characters")
    if value is None or not isinstance(value, str | int | float | bool | dt.date):
        raise reader.fail(node, f"{where} must be text, a number, true/false or a date")
    return value


def _min_group_size(reader: _Reader, node: yaml.Node) -> int:
    found = reader.mapping(node, "aggregate_only", SCHEMA["aggregate_only"] or {})
    if "min_group_size" not in found:
        raise reader.fail(node, "aggregate_only needs min_group_size: K (at least 2)")
    size_node = found["min_group_size"][1]
    size = reader.scalar(size_node, "aggregate_only.min_group_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 2 <= size <= 1_000_000:
        raise reader.fail(
            size_node, "aggregate_only.min_group_size must be a whole number from 2 to 1000000"
        )
    return size


def _limits(reader: _Reader, node: yaml.Node) -> Limits:
    found = reader.mapping(node, "limits", SCHEMA["limits"] or {})
    values = {}
    for key, (_, value_node) in found.items():
        value = reader.scalar(value_node, f"limits.{key}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise reader.fail(value_node, f"limits.{key} must be a whole number, at least 1")
        values[key] = value
    return Limits(**values)


def _obligations(reader: _Reader, node: yaml.Node) -> Obligations:
    found = reader.mapping(node, "obligations", SCHEMA["obligations"] or {})
    days = 0
    if "delete_within_days" in found:
        days_node = found["delete_within_days"][1]
        days = reader.scalar(days_node, "obligations.delete_within_days")
        if not isinstance(days, int) or isinstance(days, bool) or days < 1:
            raise reader.fail(
                days_node,
                "obligations.delete_within_days must be a whole number of days, at least 1",
            )
    attribution = (
        reader.text(found["attribution"][1], "obligations.attribution")
        if "attribution" in found
        else ""
    )
    terms = (
        reader.text_list(found["terms"][1], "obligations.terms", ANY_TEXT)
        if "terms" in found
        else ()
    )
    return Obligations(days, attribution, terms)


def _lowered(reader: _Reader) -> Any:
    def read(node: yaml.Node, where: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                # ASCII only: str.lower() maps some non-ASCII letters (the Kelvin sign) to ASCII.
                if isinstance(item, yaml.ScalarNode) and item.value.isascii():
                    item.value = item.value.lower()
        return reader.text_list(node, where, pattern)

    return read
