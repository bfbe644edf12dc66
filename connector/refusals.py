"""Words of refusals that several layers must say identically.

A hidden column is refused by the policy decision; a column that does not exist is refused
when the query is bound. Both must read the same, or a peer could probe which names exist.
"""

from __future__ import annotations

from collections.abc import Sequence


def column_refusal(column: str, datasets: Sequence[str]) -> str:
    """Why a query naming column is refused, whether it is hidden or does not exist."""
    if len(datasets) == 1:
        return f"column {column} of dataset {datasets[0]} is not allowed"
    return f"column {column} is not allowed (datasets {', '.join(sorted(datasets))})"
