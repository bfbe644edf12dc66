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
from connector.names import COLUMN_NAME, DATASET_NAME, MEMBER_ID, POLICY_ID, PURPOSE
from connector.policy.yaml_strict import ANY_TEXT, PolicyReader, check_events, pattern_rule
from connector.shaping import (
    MASK_KINDS,
    RANGE_OPERATORS,
    FilterValue,
    MaskKind,
    Noise,
    RowFilter,
    Shaping,
)

POLICY_FORMAT = 1
MAX_POLICY_BYTES = 1024 * 1024

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
    "aggregate_only": {"min_group_size": None, "noise": None, "group_by": None},
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

NOISE_KEYS = {"epsilon": None, "epsilon_per_day": None, "bounds": None}
MAX_EPSILON = 10.0
MAX_EPSILON_PER_DAY = 1000.0
MIN_EPSILON = 1e-6  # the budget ledger counts whole micro-epsilons
MAX_BOUND = 1e15  # sums of clamped values stay exact in 64-bit integers and doubles


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


def parse_policy(path: Path, text: bytes | None = None) -> UsagePolicy:
    """Parse and validate a policy file; PolicyError names the file, the line and the fix."""
    data = text if text is not None else _read(path)
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"larger than {MAX_POLICY_BYTES} bytes", path=str(path))
    try:
        document = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("not UTF-8 text", path=str(path)) from None
    try:
        check_events(path, document)
        root = yaml.compose(document, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"not valid YAML: {problem}", path=str(path), line=line) from None
    reader = PolicyReader(path)
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


def _policy(reader: PolicyReader, top: dict[str, Any], path: Path, sha256: str) -> UsagePolicy:
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
    allow = lower(columns["allow"][1], "columns.allow", COLUMN_NAME)
    masks = _masks(reader, columns["mask"][1], allow) if "mask" in columns else ()
    return UsagePolicy(
        id=reader.text(top["id"][1], "id", POLICY_ID),
        version=version,
        description=reader.text(top["description"][1], "description", ANY_TEXT),
        datasets=lower(top["datasets"][1], "datasets", DATASET_NAME),
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
            masks=masks,
            filters=_row_filters(reader, top["rows"][1]) if "rows" in top else (),
            **(
                _aggregate_only(reader, top["aggregate_only"][1], allow, masks)
                if "aggregate_only" in top
                else {}
            ),
        ),
    )


def _column_name(reader: PolicyReader, node: yaml.Node, where: str) -> str:
    name = reader.text(node, where)
    lowered = name.lower() if name.isascii() else name
    if not COLUMN_NAME.fullmatch(lowered):
        raise reader.fail(
            node, f"{where} {name!r} is not allowed here ({pattern_rule(COLUMN_NAME)})"
        )
    return lowered


def _masks(
    reader: PolicyReader, node: yaml.Node, allow: tuple[str, ...]
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


def _row_filters(reader: PolicyReader, node: yaml.Node) -> tuple[RowFilter, ...]:
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


def _row_filter(reader: PolicyReader, column: str, node: yaml.Node) -> RowFilter:
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


def _filter_value(reader: PolicyReader, node: yaml.Node, where: str) -> FilterValue:
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


def _aggregate_only(
    reader: PolicyReader,
    node: yaml.Node,
    allow: tuple[str, ...],
    masks: tuple[tuple[str, Any], ...],
) -> dict[str, Any]:
    """The Shaping fields of aggregate_only: min_group_size, noise and group_by."""
    found = reader.mapping(node, "aggregate_only", SCHEMA["aggregate_only"] or {})
    if "min_group_size" not in found:
        raise reader.fail(node, "aggregate_only needs min_group_size: K (at least 2)")
    terms: dict[str, Any] = {"min_group_size": _min_group_size(reader, found["min_group_size"][1])}
    if "noise" in found:
        terms["noise"] = _noise(reader, found["noise"][1], allow)
    if "group_by" in found:
        granted = set(allow) | {column for column, _ in masks}
        terms["group_by"] = _group_by(reader, found["group_by"][1], granted)
    return terms


def _noise(reader: PolicyReader, node: yaml.Node, allow: tuple[str, ...]) -> Noise:
    found = reader.mapping(node, "aggregate_only.noise", NOISE_KEYS)
    for key in ("epsilon", "epsilon_per_day"):
        if key not in found:
            raise reader.fail(
                node,
                f"aggregate_only.noise needs {key}: a number, like "
                "{epsilon: 1.0, epsilon_per_day: 5.0, bounds: {defects: [0, 100]}}",
            )
    epsilon_node = found["epsilon"][1]
    epsilon = _positive_number(reader, epsilon_node, "aggregate_only.noise.epsilon")
    if not MIN_EPSILON <= epsilon <= MAX_EPSILON:
        raise reader.fail(
            epsilon_node,
            f"aggregate_only.noise.epsilon must be greater than 0 and at most {MAX_EPSILON:g} "
            "(smaller is more private; 0.1 to 1 is usual)",
        )
    daily_node = found["epsilon_per_day"][1]
    daily = _positive_number(reader, daily_node, "aggregate_only.noise.epsilon_per_day")
    if not epsilon <= daily <= MAX_EPSILON_PER_DAY:
        raise reader.fail(
            daily_node,
            f"aggregate_only.noise.epsilon_per_day must be at least epsilon ({epsilon:g}) and at "
            f"most {MAX_EPSILON_PER_DAY:g}: it is what one member may spend in a day",
        )
    bounds = _bounds(reader, found["bounds"][1], allow) if "bounds" in found else ()
    return Noise(epsilon=epsilon, epsilon_per_day=daily, bounds=bounds)


def _positive_number(reader: PolicyReader, node: yaml.Node, where: str) -> float:
    value = reader.scalar(node, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise reader.fail(node, f"{where} must be a number, like 1.0")
    if not math.isfinite(value) or value <= 0:
        raise reader.fail(node, f"{where} must be a finite number greater than 0")
    return float(value)


def _bounds(
    reader: PolicyReader, node: yaml.Node, allow: tuple[str, ...]
) -> tuple[tuple[str, float, float], ...]:
    where = "aggregate_only.noise.bounds"
    if not isinstance(node, yaml.MappingNode) or not node.value:
        raise reader.fail(
            node, f"{where} must map columns to [low, high], like {{defects: [0, 100]}}"
        )
    bounds: dict[str, tuple[float, float]] = {}
    for key_node, value_node in node.value:
        column = _column_name(reader, key_node, f"a column of {where}")
        if column in bounds:
            raise reader.fail(key_node, f"column {column} appears twice in {where}")
        if column not in allow:
            raise reader.fail(
                key_node,
                f"{where}.{column}: only a column in columns.allow (not masked) can be summed; "
                "allow it or remove its bounds",
            )
        if not isinstance(value_node, yaml.SequenceNode) or len(value_node.value) != 2:
            raise reader.fail(value_node, f"{where}.{column} must be [low, high], like [0, 100]")
        low, high = (_bound(reader, item, f"{where}.{column}") for item in value_node.value)
        if not low < high:
            raise reader.fail(value_node, f"{where}.{column} needs low < high, like [0, 100]")
        bounds[column] = (low, high)
    return tuple((column, low, high) for column, (low, high) in bounds.items())


def _bound(reader: PolicyReader, node: yaml.Node, where: str) -> float:
    value = reader.scalar(node, where)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise reader.fail(node, f"{where} must hold two numbers, like [0, 100]")
    if not math.isfinite(value) or abs(value) > MAX_BOUND:
        raise reader.fail(node, f"{where} must hold finite numbers of at most {MAX_BOUND:g}")
    return value


def _group_by(
    reader: PolicyReader, node: yaml.Node, granted: set[str]
) -> tuple[tuple[str, ...], ...]:
    where = "aggregate_only.group_by"
    example = "like [[plant], [plant, week]]"
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise reader.fail(node, f"{where} must be a non-empty list of column lists, {example}")
    sets: list[tuple[str, ...]] = []
    for item in node.value:
        if not isinstance(item, yaml.SequenceNode) or not item.value:
            raise reader.fail(item, f"each entry of {where} must be a non-empty list, {example}")
        columns = tuple(_column_name(reader, c, f"a column of {where}") for c in item.value)
        if len(set(columns)) != len(columns):
            raise reader.fail(item, f"an entry of {where} lists a column twice")
        for column, column_node in zip(columns, item.value, strict=True):
            if column not in granted:
                raise reader.fail(
                    column_node,
                    f"{where} names column {column}, which the policy does not grant; grant it "
                    "in columns.allow or columns.mask, or remove it",
                )
        if any(set(columns) == set(seen) for seen in sets):
            raise reader.fail(item, f"{where} declares the set {list(columns)} twice")
        sets.append(columns)
    return tuple(sets)


def _min_group_size(reader: PolicyReader, size_node: yaml.Node) -> int:
    size = reader.scalar(size_node, "aggregate_only.min_group_size")
    if not isinstance(size, int) or isinstance(size, bool) or not 2 <= size <= 1_000_000:
        raise reader.fail(
            size_node, "aggregate_only.min_group_size must be a whole number from 2 to 1000000"
        )
    return size


def _limits(reader: PolicyReader, node: yaml.Node) -> Limits:
    found = reader.mapping(node, "limits", SCHEMA["limits"] or {})
    values = {}
    for key, (_, value_node) in found.items():
        value = reader.scalar(value_node, f"limits.{key}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise reader.fail(value_node, f"limits.{key} must be a whole number, at least 1")
        values[key] = value
    return Limits(**values)


def _obligations(reader: PolicyReader, node: yaml.Node) -> Obligations:
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


def _lowered(reader: PolicyReader) -> Any:
    def read(node: yaml.Node, where: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                # ASCII only: str.lower() maps some non-ASCII letters (the Kelvin sign) to ASCII.
                if isinstance(item, yaml.ScalarNode) and item.value.isascii():
                    item.value = item.value.lower()
        return reader.text_list(node, where, pattern)

    return read
