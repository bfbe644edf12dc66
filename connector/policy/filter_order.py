"""Whether a changed row filter admits more rows or fewer, where that can be proven: values
in `in` lists as sets, range bounds ordered for numbers and dates; text bounds are never
ordered (a column's collation is not known here). None: it cannot be told."""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Iterable
from typing import Any

from connector.shaping import FilterValue, RowFilter


class Direction(enum.Enum):
    """Whether a change grants more (widening), less (narrowing), or no access (note)."""

    WIDENS = "widening"
    NARROWS = "narrowing"
    NOTE = "note"


def filter_direction(old: RowFilter, new: RowFilter) -> Direction | None:
    """NARROWS when new lets through only rows old did, None when equal, else WIDENS."""
    if old.values and new.values:
        was, now = {_key(v) for v in old.values}, {_key(v) for v in new.values}
        if was == now:
            return None
        return Direction.NARROWS if now <= was else Direction.WIDENS
    if new.values:  # a list inside the old bounds narrows
        fits = [_within(v, old.bounds) for v in new.values]
        return Direction.NARROWS if all(fits) else Direction.WIDENS
    if old.values:  # a range in place of a list of values is not provably smaller
        return Direction.WIDENS
    sides = [
        _bound_change(_bound(old, lower), _bound(new, lower), lower) for lower in (True, False)
    ]
    if "looser" in sides or "unknown" in sides:
        return Direction.WIDENS
    return Direction.NARROWS if "tighter" in sides else None


def ordered(old: RowFilter, new: RowFilter) -> bool:
    """True when the two filters compare exactly: two lists, or values of one ordered kind."""
    if old.values and new.values:
        return True
    values = [*old.values, *new.values, *(v for _, v in old.bounds + new.bounds)]
    return all(_order(values[0], v) is not None for v in values)


def _key(value: FilterValue) -> tuple[str, FilterValue]:
    """A value with its kind, so 1 and true, or a date and a text, never compare equal."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", value)
    if isinstance(value, dt.datetime):
        return ("datetime", value)
    if isinstance(value, dt.date):
        return ("date", value)
    return ("text", value)


def _order(a: FilterValue, b: FilterValue) -> int | None:
    """-1, 0 or 1 where a and b have one known order (numbers, dates, times); else None.

    Text is not ordered: how it compares depends on the column's type, which a diff does not see.
    """
    kind_a, kind_b = _key(a)[0], _key(b)[0]
    if kind_a != kind_b or kind_a not in ("number", "date", "datetime"):
        return None
    left: Any = a
    right: Any = b
    return int(left > right) - int(left < right)


def _bound(row_filter: RowFilter, lower: bool) -> tuple[str, FilterValue] | None:
    ops = ("gte", "gt") if lower else ("lte", "lt")
    return next(((op, v) for op, v in row_filter.bounds if op in ops), None)


def _bound_change(
    old: tuple[str, FilterValue] | None, new: tuple[str, FilterValue] | None, lower: bool
) -> str:
    """'same', 'tighter', 'looser' or 'unknown' for one side of a range."""
    if old is None or new is None:
        return "same" if old == new else ("tighter" if old is None else "looser")
    if old[0] == new[0] and _key(old[1]) == _key(new[1]):
        return "same"
    order = _order(new[1], old[1])
    if order is None:
        return "unknown"
    if order == 0:  # same value: a strict bound (gt, lt) is the tighter one
        return "tighter" if new[0] in ("gt", "lt") else "looser"
    return "tighter" if (order > 0) == lower else "looser"


def _within(value: FilterValue, bounds: Iterable[tuple[str, FilterValue]]) -> bool:
    tests: dict[str, Callable[[int], bool]] = {
        "gte": lambda o: o >= 0,
        "gt": lambda o: o > 0,
        "lte": lambda o: o <= 0,
        "lt": lambda o: o < 0,
    }
    for op, bound in bounds:
        order = _order(value, bound)
        if order is None or not tests[op](order):
            return False
    return True
