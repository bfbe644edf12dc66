"""Masks across policies: a column hashed for a member under one policy must not be in the
clear for the same member under another.

With both grants, a member joins the two answers on a clear key and maps every hash to its
value, decoding the hashes of rows the clear grant never showed. The connector warns about
such pairs (`policy verify`, the server log) and, with `[policies] mask_consistency =
"refuse"`, refuses that member's queries on that dataset until the owner fixes the policies.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from connector.policy.model import UsagePolicy
from connector.policy.ref import PolicyRef

MASK_CONSISTENCY = ("warn", "refuse")


@dataclass(frozen=True)
class MaskConflict:
    """One column masked for a member by one policy and shown in the clear by another."""

    member: str
    dataset: str
    column: str
    masked_by: PolicyRef
    clear_by: PolicyRef

    def describe(self) -> str:
        """The conflict in words, for the owner (names both policies)."""
        return (
            f"column {self.column} of dataset {self.dataset} is masked for member "
            f"{self.member} by {self.masked_by} but in the clear by {self.clear_by}: joining "
            "the two answers decodes the hashes; mask it in both or in neither"
        )

    def peer_reason(self) -> str:
        """Why the member's query is refused (its own policies only, so both are named)."""
        return (
            f"column {self.column} of dataset {self.dataset} is masked for you by policy "
            f"{self.masked_by} but in the clear by policy {self.clear_by}; the owner must make "
            "them consistent before this dataset is answered"
        )


def mask_conflicts(policies: Sequence[UsagePolicy]) -> tuple[MaskConflict, ...]:
    """Every (member, dataset, column) masked under one policy and clear under another."""
    found: dict[tuple[str, str, str, PolicyRef, PolicyRef], MaskConflict] = {}
    for masked in policies:
        for clear in policies:
            if masked is clear:
                continue
            for conflict in _pair_conflicts(masked, clear):
                key = (
                    conflict.member,
                    conflict.dataset,
                    conflict.column,
                    conflict.masked_by,
                    conflict.clear_by,
                )
                found[key] = conflict
    return tuple(found[k] for k in sorted(found))


def _pair_conflicts(masked: UsagePolicy, clear: UsagePolicy) -> Iterable[MaskConflict]:
    columns = {c for c, _ in masked.shaping.masks} & set(clear.columns_allow)
    if not columns:
        return
    members = set(masked.members) & set(clear.members)
    datasets = set(masked.datasets) & set(clear.datasets)
    for member in sorted(members):
        for dataset in sorted(datasets):
            for column in sorted(columns):
                yield MaskConflict(
                    member,
                    dataset,
                    column,
                    PolicyRef(masked.id, masked.version),
                    PolicyRef(clear.id, clear.version),
                )


def conflicts_for(
    conflicts: Iterable[MaskConflict], member: str, datasets: Iterable[str]
) -> tuple[MaskConflict, ...]:
    """The conflicts that concern member on any of datasets."""
    wanted = set(datasets)
    return tuple(c for c in conflicts if c.member == member and c.dataset in wanted)
