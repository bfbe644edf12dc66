"""What changes between two sets of policies paired by id: policies added and withdrawn,
each one's own changes, and mask conflicts and shaping clashes that appear or go away."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from connector.errors import PolicyError
from connector.policy.consistency import MaskConflict, mask_conflicts
from connector.policy.diff import Change, diff_policies
from connector.policy.filter_order import Direction
from connector.policy.model import UsagePolicy, parse_policy
from connector.policy.signing import policy_files


def load_policies(path: Path) -> dict[str, UsagePolicy]:
    """The policies of a file or a folder of *.yaml files, by id; PolicyError names the file."""
    if path.is_dir():
        files = policy_files(path)
    elif path.exists():
        files = [path]
    else:
        raise PolicyError(
            "no such file or folder; give a policy file or a folder of them", path=str(path)
        )
    found: dict[str, UsagePolicy] = {}
    for file in files:
        policy = parse_policy(file)
        if policy.id in found:
            raise PolicyError(
                f"policy id {policy.id} is also in {found[policy.id].path}; keep one version of "
                "each policy in a folder, or diff the two files directly",
                path=str(file),
            )
        found[policy.id] = policy
    return found


def diff_sets(old: Mapping[str, UsagePolicy], new: Mapping[str, UsagePolicy]) -> list[Change]:
    """Changes between two sets of policies paired by id: a new id widens, a removed one narrows."""
    changes = []
    for policy_id in sorted(old.keys() | new.keys()):
        before, after = old.get(policy_id), new.get(policy_id)
        if before is None and after is not None:
            changes.append(
                Change(
                    policy_id,
                    "policy",
                    Direction.WIDENS,
                    f"new policy (version {after.version}): grants {', '.join(after.datasets)} to "
                    f"{', '.join(after.members)} for {', '.join(after.purposes)}",
                )
            )
        elif after is None and before is not None:
            changes.append(
                Change(
                    policy_id,
                    "policy",
                    Direction.NARROWS,
                    f"policy withdrawn (was version {before.version}): no longer grants "
                    f"{', '.join(before.datasets)} to {', '.join(before.members)}",
                )
            )
        elif before is not None and after is not None:
            changes += diff_policies(before, after)
    old_set, new_set = list(old.values()), list(new.values())
    return changes + _conflict_changes(old_set, new_set) + _shaping_clash_changes(old_set, new_set)


def _shaping_clashes(policies: list[UsagePolicy]) -> set[tuple[str, str, str, str, str]]:
    """(member, dataset, purpose, id, id) where two policies apply together, in overlapping
    dates, with different shaping: the connector refuses those queries (engine, "shaping")."""
    clashes = set()
    for i, first in enumerate(policies):
        for second in policies[i + 1 :]:
            if first.shaping.canonical() == second.shaping.canonical():
                continue
            if first.valid_until <= second.valid_from or second.valid_until <= first.valid_from:
                continue
            ids = sorted((first.id, second.id))
            for member in set(first.members) & set(second.members):
                for dataset in set(first.datasets) & set(second.datasets):
                    for purpose in set(first.purposes) & set(second.purposes):
                        clashes.add((member, dataset, purpose, ids[0], ids[1]))
    return clashes


def _shaping_clash_changes(old: list[UsagePolicy], new: list[UsagePolicy]) -> list[Change]:
    before, after = _shaping_clashes(old), _shaping_clashes(new)
    changes = [
        Change(
            f"{first} + {second}",
            "shaping",
            Direction.WIDENS,
            f"clash resolved: {member}'s queries on {dataset} for {purpose} were refused (two "
            "policies shape it differently) and are answered again: review",
        )
        for member, dataset, purpose, first, second in sorted(before - after)
    ]
    changes += [
        Change(
            f"{first} + {second}",
            "shaping",
            Direction.NARROWS,
            f"new clash: {member}'s queries on {dataset} for {purpose} will be refused while "
            "both apply (they shape it differently); merge them into one policy",
        )
        for member, dataset, purpose, first, second in sorted(after - before)
    ]
    return changes


def _conflict_changes(old: list[UsagePolicy], new: list[UsagePolicy]) -> list[Change]:
    """Columns hashed by one policy and clear under another, for the same member, appearing or
    going away: both can widen (a join decodes the hashes; a lifted refusal answers again)."""

    def by_key(policies: list[UsagePolicy]) -> dict[tuple[str, ...], MaskConflict]:
        return {
            (c.member, c.dataset, c.column, c.masked_by.id, c.clear_by.id): c
            for c in mask_conflicts(policies)
        }

    before, after = by_key(old), by_key(new)
    changes = [
        Change(
            f"{key[3]} + {key[4]}",
            "masks",
            Direction.WIDENS,
            f"new conflict: {after[key].describe()}",
        )
        for key in sorted(after.keys() - before.keys())
    ]
    changes += [
        Change(
            f"{key[3]} + {key[4]}",
            "masks",
            Direction.WIDENS,
            f"conflict resolved: column {key[2]} of {key[1]} for {key[0]}; where [policies] "
            "mask_consistency = refuse, that member's queries on it were refused and are "
            "answered again: review",
        )
        for key in sorted(before.keys() - after.keys())
    ]
    return changes
