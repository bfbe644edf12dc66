"""Incremental reads: the rows of an append-only dataset added since a version a peer has.

The rows appended after version N are those from the rows the dataset had at N (its version
log) up to the rows it has now; a replace since N leaves no such rows, and is refused. The
range becomes a shaped copy of its own (enforce.relation_for), so every term of the policy
applies to those rows exactly as to a whole read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from connector.enforce import RowRange
from connector.errors import QueryRejected
from connector.store import DatasetInfo


def row_ranges(
    since: int,
    datasets_read: Sequence[str],
    datasets: Mapping[str, DatasetInfo],
    rows_at: Callable[[str, int], int | None],
) -> dict[str, RowRange]:
    """The rows a since_version request reads (none to limit when since is 0)."""
    if not since:
        return {}
    if len(datasets_read) != 1:
        raise QueryRejected(
            "since_version applies to a query over one dataset; query each dataset on its own"
        )
    name = datasets_read[0]
    info = datasets.get(name)
    if info is None:
        return {}  # nothing to read: refused as any other name without data
    if since > info.version:
        raise QueryRejected(
            f"dataset {name} is at version {info.version}; since_version {since} is ahead of "
            "it (your catalog shows the current version)"
        )
    start = rows_at(name, since) if since >= info.replaced_at else None
    if start is None and since >= info.replaced_at:
        raise QueryRejected(
            f"version {since} of dataset {name} is not in its version log (loaded before "
            "versions were kept): read it whole (without since_version), then ask for rows "
            f"since version {info.version} or later"
        )
    if start is None:
        raise QueryRejected(
            f"dataset {name} was replaced at version {info.replaced_at}, not only appended to "
            f"since version {since}, so there are no rows added since then to send: read it "
            f"whole (without since_version), then ask for rows since version {info.version} "
            "or later"
        )
    return {name: RowRange(since, start, info.rows)}
