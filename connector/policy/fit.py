"""Does a valid policy fit the home's data? Warnings for policies that can never work.

A policy can be well-formed and signed yet grant nothing: a dataset or column that does not
exist (a typo), a row filter on a column the dataset lacks or with a value its type cannot
hold (`week: {gte: March}` on a DATE column). `policy verify` prints these warnings and the
server logs them, so nobody believes a grant is in force that answers nothing.
"""

from __future__ import annotations

import datetime as dt
import difflib
from collections.abc import Iterable, Mapping

from connector.policy.model import UsagePolicy
from connector.shaping import FilterValue
from connector.store import DatasetInfo

_NUMBER_TYPES = (
    "TINYINT SMALLINT INTEGER BIGINT HUGEINT UTINYINT USMALLINT UINTEGER UBIGINT UHUGEINT "
    "FLOAT DOUBLE DECIMAL REAL"
).split()
_TEXT_TYPES = ("VARCHAR", "TEXT", "STRING", "CHAR", "BPCHAR")


def fit_warnings(policy: UsagePolicy, datasets: Mapping[str, DatasetInfo]) -> list[str]:
    """What in policy cannot work with these datasets, each with the fix."""
    warnings = []
    for name in policy.datasets:
        info = datasets.get(name)
        if info is None:
            hint = _did_you_mean(name, datasets)
            warnings.append(
                f"dataset {name} does not exist in this home's data{hint}; the policy grants "
                "nothing for it until it is ingested"
            )
            continue
        warnings += _column_warnings(policy, info)
    for purpose in policy.purposes:
        if purpose != purpose.strip().lower() or " " in purpose:
            warnings.append(
                f"purpose {purpose!r} has capitals or spaces: peers must send it exactly as "
                "written; a lower-case word like "
                f"{purpose.strip().lower().replace(' ', '-')!r} is what peers usually send"
            )
    return warnings


def _column_warnings(policy: UsagePolicy, info: DatasetInfo) -> list[str]:
    types = {c.name: c.type for c in info.columns}
    warnings = [
        f"column {column} is not in dataset {info.name}{_did_you_mean(column, types)}; "
        "it is granted but no query can read it"
        for column in policy.columns
        if column not in types
    ]
    for row_filter in policy.shaping.filters:
        column_type = types.get(row_filter.column)
        if column_type is None:
            warnings.append(
                f"the row filter names column {row_filter.column}, which dataset {info.name} "
                f"does not have{_did_you_mean(row_filter.column, types)}: every query on it "
                "is refused"
            )
            continue
        values = list(row_filter.values) + [v for _, v in row_filter.bounds]
        wrong = [v for v in values if not value_fits(v, column_type)]
        if wrong:
            warnings.append(
                f"the row filter on {info.name}.{row_filter.column} ({column_type}) holds "
                f"{wrong[0]!r}, which is not a value of that type: every query on it is "
                "refused; write a value of the column's type"
            )
    return warnings


def value_fits(value: FilterValue, column_type: str) -> bool:
    """Whether a row filter's value can be a value of a column of this DuckDB type."""
    kind = column_type.split("(", maxsplit=1)[0].upper()
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind in _NUMBER_TYPES:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "DATE" or kind.startswith("TIMESTAMP"):
        return isinstance(value, dt.date)
    if kind in _TEXT_TYPES:
        return isinstance(value, str)
    return True  # other types: DuckDB decides when the shaped copy is built


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
