"""`policy new`: a first draft of a policy as commented YAML, from a legal team's answers.

The draft says in comments what each key means, so that the file is its own guide; every
value is checked before anything is written, and the text is read back by the strict reader.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from connector.errors import PolicyError
from connector.names import COLUMN_NAME, DATASET_NAME, MEMBER_ID, POLICY_ID, PURPOSE
from connector.policy.yaml_strict import ANY_TEXT, pattern_rule
from connector.shaping import MASK_KINDS


@dataclass(frozen=True)
class DraftTerms:
    """What a new policy grants: the answers `policy new` collects."""

    policy_id: str
    description: str
    datasets: tuple[str, ...]
    members: tuple[str, ...]
    purposes: tuple[str, ...]
    valid_from: dt.date
    valid_until: dt.date
    columns: tuple[str, ...]
    masks: Mapping[str, str] = field(default_factory=dict)


def check_terms(terms: DraftTerms) -> None:
    """PolicyError naming the first answer that cannot go into a policy, and the fix."""
    _check_one("the policy id", terms.policy_id, POLICY_ID)
    _check_one("the description", terms.description, ANY_TEXT)
    for what, values, pattern in (
        ("dataset", terms.datasets, DATASET_NAME),
        ("member", terms.members, MEMBER_ID),
        ("purpose", terms.purposes, PURPOSE),
        ("column", terms.columns, COLUMN_NAME),
        ("masked column", tuple(terms.masks), COLUMN_NAME),
    ):
        if not values and what != "masked column":
            raise PolicyError(f"no {what} given: name at least one")
        for value in values:
            _check_one(f"{what} {value!r}", value, pattern)
        if len(set(values)) != len(values):
            raise PolicyError(f"a {what} is given twice: name each once")
    for column, kind in terms.masks.items():
        if kind not in MASK_KINDS:
            raise PolicyError(f"mask {kind!r} of column {column}: use {', '.join(MASK_KINDS)}")
        if column in terms.columns:
            raise PolicyError(f"column {column} is both allowed and masked: choose one")
    if terms.valid_until <= terms.valid_from:
        raise PolicyError(
            f"the end ({terms.valid_until}) is not after the start ({terms.valid_from}): "
            "give the dates the contract names"
        )


def _check_one(what: str, value: str, pattern: re.Pattern[str]) -> None:
    if not pattern.fullmatch(value):
        raise PolicyError(f"{what} is not allowed: {pattern_rule(pattern)}")


def draft_text(terms: DraftTerms) -> str:
    """The policy as commented YAML (checked first: PolicyError when an answer is unusable)."""
    check_terms(terms)
    lines = [
        "# Usage policy drafted with `connector policy new`. Check it with `connector policy",
        "# lint`, then sign it with `connector policy sign` (or `policy publish`).",
        "# Identifies the policy; keep it when the terms change, and raise the version.",
        f"id: {terms.policy_id}",
        "version: 1",
        "# In words: what is shared, with whom and why (the contract's own terms).",
        f"description: {_quoted(terms.description)}",
        "# The datasets of this home the policy covers.",
        f"datasets: [{', '.join(terms.datasets)}]",
        "# Member ids of the data space that may query them.",
        f"grantees: {{members: [{', '.join(terms.members)}]}}",
        "# A query is answered only for one of these purposes, sent exactly as written.",
        f"purposes: [{', '.join(_quoted(p) for p in terms.purposes)}]",
        "# From the start of `from` to the start of `until` (UTC dates).",
        f"valid: {{from: {terms.valid_from.isoformat()}, until: {terms.valid_until.isoformat()}}}",
        "columns:",
        "  # Columns shown in the clear; every other column stays hidden.",
        f"  allow: [{', '.join(terms.columns)}]",
    ]
    if terms.masks:
        lines += [
            "  # Columns shown masked: hash (comparable, not readable), redact or null.",
            "  mask: {" + ", ".join(f"{c}: {k}" for c, k in terms.masks.items()) + "}",
        ]
    lines += [
        "# Further terms, if the contract has them (see the README's policy reference):",
        "# rows: {where: {plant: [Leipzig]}}           only these rows",
        "# aggregate_only: {min_group_size: 20}        only totals of groups of 20 or more",
        "# limits: {queries_per_day: 500}              how much a grantee may take",
        "# obligations: {delete_within_days: 90}       what the grantee takes on",
    ]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    """Text in YAML single quotes, so that no word of it is read as a number, date or key."""
    return "'" + text.replace("'", "''") + "'"
