"""The guard's size rule: no value a query builds may outgrow a bound set by its constants.

DuckDB's `memory_limit` does not count strings and lists built while expressions run, nor
aggregate states: `repeat(plant, 4000000)` takes gigabytes for a one-row answer. This rule
bounds, from the parsed query alone, how large each value can get: a column value counts as
COLUMN_BYTES (widths are unknown to the guard), constants count as written, and every
function that makes values grow (repeat, lpad/rpad, format/printf, replace, regexp_replace,
list builders, concatenation, top-n and row-collecting aggregates) multiplies or adds as it
would at worst. What the guard cannot know (real column widths, row counts, batch sizes) is
bounded by the process's own memory limit (process_memory.py).

`function_bytes` is the rule for one function given its arguments' bounds; it reads no
syntax tree, so a check of bound plans can apply the same rule later (valuesize_tree applies
it to the parsed query).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from connector.packing import TOP_N  # one list of the top-n aggregates, for both rules

MAX_VALUE_BYTES = 64 * 1024  # any one value an expression builds, at worst
MAX_ROW_BYTES = 256 * 1024  # one result row (all selected values together)
COLUMN_BYTES = 64  # what the guard assumes for one stored value (real widths are unknown)
STAR_COLUMNS = 64  # what the guard assumes a * or COLUMNS(...) expands to
CHAR_BYTES = 4  # a character counted by a width (lpad, format) may take 4 bytes in UTF-8
ELEMENT_BYTES = 16  # DuckDB's per-element overhead in lists and structs
NUMBER_BYTES = 16
MAX_TOP_N = 1000  # n of max(x, n), arg_max(x, y, n), min_by(x, y, n)...
HUGE = 2**62  # stands for a number too large to matter

# Aggregates that build one value out of every row they see.
COLLECTING = frozenset("string_agg group_concat listagg list array_agg histogram list_agg".split())
# Functions whose result is a number, a truth value, a date or a digest, whatever they read.
SMALL_RESULTS = frozenset(
    """
    length len strlen char_length character_length octet_length bit_length strlen
    count count_star sum avg mean median stddev stddev_samp stddev_pop variance var_samp
    var_pop corr covar_pop covar_samp regr_slope regr_intercept regr_r2
    approx_count_distinct entropy kurtosis skewness product sum_no_overflow fsum favg
    bool_and bool_or every bit_and bit_or bit_xor
    position strpos instr levenshtein jaccard ascii unicode array_length cardinality
    list_contains list_has array_contains contains starts_with ends_with prefix suffix
    regexp_full_match isnan isinf isfinite bit_count hash md5 sha256
    year month day week weekofyear quarter hour minute second millisecond microsecond
    dayofweek dayofmonth dayofyear isodow isoyear yearweek weekday epoch epoch_ms era
    decade century millennium julian date_part datepart date_diff datediff date_sub
    datesub date_trunc datetrunc last_day make_date make_time make_timestamp
    row_number rank dense_rank percent_rank cume_dist ntile
    """.split()
)
SPLITTING = frozenset(
    """
    string_split str_split string_split_regex str_split_regex regexp_split_to_array
    string_to_array split regexp_extract_all
    """.split()
)
LIST_BUILDERS = frozenset("list_value list_pack struct_pack row array_value map".split())
RANGES = frozenset(("range", "generate_series"))
_DIGITS = re.compile(r"\d+")


@dataclass(frozen=True)
class Argument:
    """What the rule needs of one argument: an upper bound of its size and its constant."""

    bytes: int
    constant: str | None = None  # the text of a constant argument (None: computed)


class TooLarge(Exception):
    """One function would build a value past the bound; says which and what to do."""


def function_bytes(name: str, args: Sequence[Argument]) -> int:
    """An upper bound of the bytes of name(args...), or TooLarge (no syntax involved)."""
    sizes = [a.bytes for a in args]
    if name in SMALL_RESULTS:
        size = NUMBER_BYTES * 4
    elif name == "repeat":
        size = _at(sizes, 0) * _count(name, args, 1, "count")
    elif name in ("lpad", "rpad"):
        size = _count(name, args, 1, "length") * CHAR_BYTES
    elif name in ("format", "printf"):
        size = _format_bytes(name, args)
    elif name == "replace":
        size = _replace_bytes(args)
    elif name == "regexp_replace":
        size = _at(sizes, 0) * (1 + _at(sizes, 2)) + _at(sizes, 2)
    elif name in SPLITTING:
        size = _at(sizes, 0) * ELEMENT_BYTES + ELEMENT_BYTES
    elif name in LIST_BUILDERS:
        size = sum(sizes) + ELEMENT_BYTES * (len(sizes) + 1)
    elif name in ("list_aggregate", "array_aggregate", "list_aggr", "aggregate"):
        size = _at(sizes, 0) * 2 + sum(sizes[1:])
    elif name in RANGES:
        size = _range_elements(name, args) * ELEMENT_BYTES
    elif name in COLLECTING:
        size = MAX_VALUE_BYTES  # as large as allowed: nothing may make it grow further
    elif name in TOP_N and len(args) > TOP_N[name]:
        n = _count(name, args, TOP_N[name], "n")
        if n > MAX_TOP_N:
            raise TooLarge(f"{name}() may keep at most {MAX_TOP_N} values, not {n}")
        size = n * (_at(sizes, 0) + ELEMENT_BYTES)
    else:
        # Everything else (concat, ||, upper, substring, coalesce, CASE...) returns at
        # most what it was given.
        size = sum(sizes) + NUMBER_BYTES
    if size > MAX_VALUE_BYTES:
        raise TooLarge(
            f"{name}() could build a value of {readable_size(size)}, more than this connector's "
            f"{readable_size(MAX_VALUE_BYTES)} per value (a column value counts as {COLUMN_BYTES} "
            "bytes); use smaller counts, widths or fewer nested calls"
        )
    return size


def _at(sizes: Sequence[int], index: int) -> int:
    return sizes[index] if index < len(sizes) else 0


def _count(name: str, args: Sequence[Argument], index: int, what: str) -> int:
    """A count argument: it must be a number written in the query."""
    if index >= len(args):
        return 1
    number = constant_number(args[index].constant)
    if number is None:
        raise TooLarge(
            f"the {what} of {name}() must be a number written in the query, so that the "
            "size of what it builds is known"
        )
    return max(0, number)


def constant_number(text: str | None) -> int | None:
    """The whole number a constant's text stands for (HUGE when past any bound)."""
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    if math.isnan(value):
        return None
    if not math.isfinite(value) or abs(value) >= HUGE:
        return HUGE if value > 0 else -HUGE
    return math.ceil(value)


def _format_bytes(name: str, args: Sequence[Argument]) -> int:
    """format('{:>N}', ...) and printf('%N.Ms', ...): widths and precisions come from the
    format string, which must therefore be written in the query."""
    fmt = args[0].constant if args else None
    if fmt is None:
        raise TooLarge(f"the format string of {name}() must be a string written in the query")
    if "*" in fmt or re.search(r"\{[^{}]*\{", fmt):
        raise TooLarge(f"{name}() must not take widths or precisions from its arguments")
    # Every number in the format string counts as a width, every field as the widest
    # argument: a bound, not an exact size.
    widths = sum(min(int(d), HUGE) if len(d) < 19 else HUGE for d in _DIGITS.findall(fmt))
    fields = fmt.count("{") + fmt.count("%") + 1
    widest = max((a.bytes for a in args[1:]), default=0)
    return len(fmt.encode()) + widths * CHAR_BYTES + fields * widest


def _replace_bytes(args: Sequence[Argument]) -> int:
    source, old, new = (list(args) + [Argument(0)] * 3)[:3]
    if old.constant and new.constant is not None:
        growth = math.ceil(len(new.constant.encode()) / len(old.constant.encode()))
        return source.bytes * max(1, growth)
    return source.bytes * max(1, new.bytes)


def _range_elements(name: str, args: Sequence[Argument]) -> int:
    numbers = [constant_number(a.constant) for a in args]
    if not numbers or any(n is None for n in numbers):
        raise TooLarge(f"the bounds of {name}() must be numbers written in the query")
    known = [n for n in numbers if n is not None]
    start, stop = (0, known[0]) if len(known) == 1 else (known[0], known[1])
    step = known[2] if len(known) > 2 and known[2] else 1
    return max(0, (stop - start) // step + 1)


def readable_size(size: int) -> str:
    """A size for a message: KiB, MiB or GiB, or "an unbounded size"."""
    if size >= HUGE:
        return "an unbounded size"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}" if size < scale * 10**6 else "an unbounded size"
    return f"{size} bytes"
