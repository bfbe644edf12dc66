"""The shaping terms of a policy file: masks, row filters and aggregate_only (noise, group_by).

Each reader turns one part of the composed YAML into the values of connector.shaping, with the
file and line in every error.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import yaml

from connector.names import COLUMN_NAME
from connector.policy.yaml_strict import ANY_TEXT, PolicyReader, pattern_rule
from connector.shaping import (
    MASK_KINDS,
    RANGE_OPERATORS,
    FilterValue,
    MaskKind,
    Noise,
    RowFilter,
)

ROWS_KEYS: dict[str, None] = {"where": None}
AGGREGATE_ONLY_KEYS: dict[str, None] = {"min_group_size": None, "noise": None, "group_by": None}
MAX_FILTER_VALUES = 1000

NOISE_KEYS = {"epsilon": None, "epsilon_per_day": None, "bounds": None}
MAX_EPSILON = 10.0
MAX_EPSILON_PER_DAY = 1000.0
MIN_EPSILON = 1e-6  # the budget ledger counts whole micro-epsilons
MAX_BOUND = 1e15  # sums of clamped values stay exact in 64-bit integers and doubles


def _column_name(reader: PolicyReader, node: yaml.Node, where: str) -> str:
    name = reader.text(node, where)
    lowered = name.lower() if name.isascii() else name
    if not COLUMN_NAME.fullmatch(lowered):
        raise reader.fail(
            node, f"{where} {name!r} is not allowed here ({pattern_rule(COLUMN_NAME)})"
        )
    return lowered


def read_masks(
    reader: PolicyReader, node: yaml.Node, allow: tuple[str, ...]
) -> tuple[tuple[str, MaskKind], ...]:
    """columns.mask: each masked column with its mask kind, none also in columns.allow."""
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


def read_row_filters(reader: PolicyReader, node: yaml.Node) -> tuple[RowFilter, ...]:
    """rows.where: one filter per column, a list of values or a pair of bounds."""
    rows = reader.mapping(node, "rows", ROWS_KEYS)
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


def read_aggregate_only(
    reader: PolicyReader,
    node: yaml.Node,
    allow: tuple[str, ...],
    masks: tuple[tuple[str, Any], ...],
) -> dict[str, Any]:
    """The Shaping fields of aggregate_only: min_group_size, noise and group_by."""
    found = reader.mapping(node, "aggregate_only", AGGREGATE_ONLY_KEYS)
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
