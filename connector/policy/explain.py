"""What a usage policy lets whom do, in plain language a legal team holds against the contract.

One structured explanation (JSON-able, for tools) and its text, section by section: who, which
purposes, when, which datasets, which columns in the clear, which masked and how, which rows,
aggregate-only and group size, noise, limits and obligations.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from connector.policy.model import Limits, UsagePolicy
from connector.shaping import FilterValue, MaskKind, RowFilter, Shaping, mask_description
from connector.store import DatasetInfo

MASK_MEANING: dict[MaskKind, str] = {
    "hash": "replaced by a keyed hash (HMAC-SHA-256 with this connector's secret key): equal "
    "values stay equal and can be counted or joined, the value itself cannot be read",
    "redact": "every value replaced by the word REDACTED: nothing of the value is shown",
    "null": "every value replaced by NULL: nothing of the value is shown",
}
OPERATOR_WORDS = {"gte": "at least", "gt": "more than", "lte": "at most", "lt": "less than"}
LIMIT_WORDS = {
    "max_rows_per_query": "rows in one answer",
    "queries_per_day": "queries a day",
    "rows_per_day": "rows a day",
    "max_bytes_per_query": "bytes in one answer",
    "bytes_per_day": "bytes a day",
}


def explanation(
    policy: UsagePolicy, datasets: Mapping[str, DatasetInfo] | None = None
) -> dict[str, Any]:
    """The policy's terms as plain JSON values; datasets (the home's) add the withheld columns."""
    shaping = policy.shaping
    explained: dict[str, Any] = {
        "id": policy.id,
        "version": policy.version,
        "description": policy.description,
        "file": str(policy.path),
        "sha256": policy.sha256,
        "members": list(policy.members),
        "roles": list(policy.roles),
        "purposes": list(policy.purposes),
        "valid_from": policy.valid_from.isoformat(),
        "valid_until": policy.valid_until.isoformat(),
        "datasets": list(policy.datasets),
        "columns_in_clear": list(policy.columns_allow),
        "columns_masked": [
            {"column": column, "mask": kind, "shown_as": mask_description(column, kind)}
            for column, kind in shaping.masks
        ],
        "rows": [filter_words(f) for f in shaping.filters],
        "rows_sql": shaping.where_sql(),
        "aggregate_only": bool(shaping.min_group_size),
        "min_group_size": shaping.min_group_size,
        "group_by": [list(columns) for columns in shaping.group_by],
        "noise": shaping.noise.as_json() if shaping.noise else None,
        "limits": limits_json(policy.limits),
        "obligations": {
            "delete_within_days": policy.obligations.delete_within_days,
            "attribution": policy.obligations.attribution,
            "terms": list(policy.obligations.terms),
        },
    }
    if datasets is not None:
        explained["columns_withheld"] = withheld_columns(policy, datasets)
    return explained


def limits_json(limits: Limits) -> dict[str, int]:
    """The limits set (a kind left out has no limit)."""
    return {key: getattr(limits, key) for key in LIMIT_WORDS if getattr(limits, key)}


def withheld_columns(
    policy: UsagePolicy, datasets: Mapping[str, DatasetInfo]
) -> dict[str, list[str]]:
    """For each of the policy's datasets the home holds: its columns the policy does not show."""
    shown = set(policy.columns)
    return {
        name: [c.name for c in datasets[name].columns if c.name not in shown]
        for name in policy.datasets
        if name in datasets
    }


def explanation_lines(
    policy: UsagePolicy, datasets: Mapping[str, DatasetInfo] | None = None
) -> list[str]:
    """The explanation as text, one term a line, in the order of a contract review."""
    shaping = policy.shaping
    lines = [
        f"Policy {policy.id}, version {policy.version} ({policy.path}, sha256 {policy.sha256})",
        f"  {policy.description}",
        _who(policy),
        f"Purposes: only for {', '.join(policy.purposes)}",
        f"When: from {moment_words(policy.valid_from)} until {moment_words(policy.valid_until)}"
        " (it ends at that moment)",
        f"Datasets: {', '.join(policy.datasets)}",
        "Columns in the clear: " + (", ".join(policy.columns_allow) or "none"),
    ]
    if shaping.masks:
        lines.append("Columns masked:")
        lines += [f"  {column}: {MASK_MEANING[kind]}" for column, kind in shaping.masks]
    else:
        lines.append("Columns masked: none")
    if datasets is not None:
        for name, columns in withheld_columns(policy, datasets).items():
            lines.append(f"Columns of {name} not shared: {', '.join(columns) or 'none'}")
    lines += _rows_lines(policy)
    lines += _limit_lines(policy.limits)
    lines += _obligation_lines(policy)
    return lines


def _rows_lines(policy: UsagePolicy) -> list[str]:
    shaping = policy.shaping
    if shaping.filters:
        lines = ["Rows: only rows where " + "; and ".join(filter_words(f) for f in shaping.filters)]
    else:
        lines = ["Rows: every row"]
    if not shaping.min_group_size:
        return [*lines, "Aggregate-only: no; single rows may be received"]
    lines.append(
        f"Aggregate-only: yes; only aggregates over groups of at least {shaping.min_group_size} "
        "rows, no single row is received"
    )
    if shaping.group_by:
        grouping = "; ".join(f"({', '.join(columns)})" for columns in shaping.group_by)
        lines.append(f"Grouping: only by {grouping}")
    else:
        lines.append("Grouping: by any of the columns shown")
    if shaping.noise is not None:
        lines.append(f"Noise: yes; {shaping.noise.describe()}")
    else:
        lines.append("Noise: none; aggregates are exact")
    return lines


def _limit_lines(limits: Limits) -> list[str]:
    set_limits = limits_json(limits)
    if not set_limits:
        return ["Limits: none"]
    return ["Limits: " + "; ".join(f"at most {n} {LIMIT_WORDS[k]}" for k, n in set_limits.items())]


def _obligation_lines(policy: UsagePolicy) -> list[str]:
    duties = policy.obligations
    lines = []
    if duties.delete_within_days:
        lines.append(f"  delete received data within {duties.delete_within_days} days")
    if duties.attribution:
        lines.append(f"  attribute as: {duties.attribution}")
    lines += [f"  term: {term}" for term in duties.terms]
    if not lines:
        return ["Obligations: none"]
    return ["Obligations of the receiving member:", *lines]


def filter_words(row_filter: RowFilter) -> str:
    """One row filter in words: 'plant is one of A, B' or 'week is at least 10 and less than 20'."""
    if row_filter.values:
        values = ", ".join(value_words(v) for v in row_filter.values)
        return f"{row_filter.column} is one of {values}"
    bounds = " and ".join(f"{OPERATOR_WORDS[op]} {value_words(v)}" for op, v in row_filter.bounds)
    return f"{row_filter.column} is {bounds}"


def value_words(value: FilterValue) -> str:
    """A filter value as written in the policy file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def moment_words(moment: dt.datetime) -> str:
    """A validity bound: the date alone at midnight UTC, else the full time."""
    if moment.time() == dt.time(0) and moment.utcoffset() == dt.timedelta(0):
        return f"{moment.date().isoformat()} 00:00 UTC"
    return moment.isoformat()


def nested_grouping_warnings(shaping: Shaping) -> list[str]:
    """Warnings for declared grouping sets that can be differenced (only without noise): a
    set inside another always can; any two sets can through the columns they share."""
    if shaping.noise is not None:
        return []
    warnings = []
    sets = shaping.group_by
    for i, first in enumerate(sets):
        for second in sets[i + 1 :]:
            coarse, fine = (first, second) if len(first) <= len(second) else (second, first)
            if set(coarse) < set(fine):
                warnings.append(
                    f"grouping sets ({', '.join(coarse)}) and ({', '.join(fine)}) nest: without "
                    f"noise, the ({', '.join(coarse)}) answer minus the ({', '.join(fine)}) "
                    "answer gives back the groups under min_group_size that the finer query "
                    "drops (differencing); declare one set, or add noise"
                )
                continue
            common = ", ".join(c for c in first if c in second) or "the grand total"
            warnings.append(
                f"grouping sets ({', '.join(first)}) and ({', '.join(second)}) both add up to "
                f"({common}): when one of them drops no group, the other's dropped small groups "
                "can be recovered by subtraction; declare one set, or add noise"
            )
    return warnings


def _who(policy: UsagePolicy) -> str:
    """Who the policy grants to, members and roles (resolved through the member directory)."""
    parts = []
    if policy.members:
        parts.append(f"member(s) {', '.join(policy.members)}")
    if policy.roles:
        parts.append(
            f"every member with role {' or '.join(policy.roles)} in the data space's signed "
            "member directory (nobody while the connector holds none)"
        )
    return f"Who: only {'; and '.join(parts)}"
