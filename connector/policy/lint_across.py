"""`policy lint` across files: duplicate ids, versions against those signed and remembered,
and policies that would be refused together at query time (asked of the Rego library)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from connector.errors import PolicyEngineError
from connector.policy.consistency import mask_conflicts
from connector.policy.engine import DecisionRequest, EmbeddedEngine
from connector.policy.lint_draft import Draft, Finding, HomeFacts, Severity
from connector.policy.model import (
    UsagePolicy,
)
from connector.policy.signing import memory_refusal


def duplicate_ids(drafts: Sequence[Draft]) -> list[Finding]:
    """Two linted files with one policy id: the same version is refused, a lower one is
    superseded (left over)."""
    findings = []
    by_id: dict[str, list[Draft]] = {}
    for draft in drafts:
        if draft.policy is not None:
            by_id.setdefault(draft.policy.id, []).append(draft)
    for policy_id, same in by_id.items():
        for draft in same[1:]:
            first = same[0]
            assert draft.policy is not None and first.policy is not None
            same_version = draft.policy.version == first.policy.version
            findings.append(
                Finding(
                    draft.path,
                    draft.lines.get("id"),
                    Severity.ERROR if same_version else Severity.WARNING,
                    f"policy id {policy_id} is also in {first.path}"
                    + (
                        f", with the same version {first.policy.version}: both are refused"
                        if same_version
                        else " with another version: only the higher one is put in force"
                    ),
                    "give each policy its own id, or keep only one file per policy",
                )
            )
    return findings


def version_findings(drafts: Sequence[Draft], home: HomeFacts) -> list[Finding]:
    """A version lower than (or equal to, with other content) one signed or in force before."""
    findings = []
    for draft in drafts:
        policy = draft.policy
        if policy is None:
            continue
        line = draft.lines.get("version")
        refusal = memory_refusal(policy, draft.sha256, home.remembered)
        if refusal is not None:
            problem, _, fix = refusal[1].partition("; ")
            findings.append(Finding(draft.path, line, Severity.ERROR, problem, fix))
            continue
        for signed in home.signed:
            if signed.id != policy.id or signed.path.resolve() == draft.path.resolve():
                continue
            if signed.version > policy.version or (
                signed.version == policy.version and signed.sha256 != draft.sha256
            ):
                findings.append(
                    Finding(
                        draft.path,
                        line,
                        Severity.ERROR,
                        f"version {policy.version} of policy {policy.id} is not above version "
                        f"{signed.version} signed before ({signed.path})",
                        f"set `version: {signed.version + 1}`",
                    )
                )
    return findings


def conflict_findings(drafts: Sequence[Draft], home: HomeFacts) -> list[Finding]:
    """Policies the connector refuses together at query time, asked of its own rules."""
    linted = {d.policy.id: d for d in drafts if d.policy is not None}
    drafted = [d.policy for d in drafts if d.policy is not None]
    others = [p for p in home.in_force if p.id not in linted]
    together = drafted + others
    findings = []
    refuse = home.mask_consistency == "refuse"
    for conflict in mask_conflicts(together):
        draft = linted.get(conflict.masked_by.id) or linted.get(conflict.clear_by.id)
        if draft is None:
            continue
        findings.append(
            Finding(
                draft.path,
                _column_line(draft, conflict.column),
                Severity.ERROR if refuse else Severity.WARNING,
                conflict.describe().partition(": ")[0]
                + (
                    ": the connector refuses this member's queries on the dataset "
                    "([policies] mask_consistency = refuse)"
                    if refuse
                    else ": joining the two answers decodes the hashes"
                ),
                f"mask {conflict.column} in both policies or in neither",
            )
        )
    for first, second in _shaping_candidates(drafted, together):
        reason = _refused_together(first, second, home.now)
        if reason is not None:
            draft = linted[first.id]
            findings.append(
                Finding(
                    draft.path,
                    draft.lines.get("id"),
                    Severity.ERROR,
                    f"policy {first.id} and policy {second.id} ({second.path}) are refused "
                    f"together at query time: {reason}",
                    "merge them into one policy, or give them different purposes or members",
                )
            )
    return findings


def _column_line(draft: Draft, column: str) -> int | None:
    for located in draft.masks + draft.allow:
        if located.value == column:
            return located.line
    return draft.lines.get("columns")


def _shaping_candidates(
    drafted: Sequence[UsagePolicy], together: Sequence[UsagePolicy]
) -> list[tuple[UsagePolicy, UsagePolicy]]:
    """Pairs that apply together somewhere (member, dataset, purpose, time) and shape their
    datasets differently: the only ones the decision library can refuse together."""
    pairs = []
    for position, first in enumerate(together):
        if first not in drafted:
            continue
        for second in together[position + 1 :]:
            if (
                set(first.members) & set(second.members)
                and set(first.datasets) & set(second.datasets)
                and set(first.purposes) & set(second.purposes)
                and first.valid_from < second.valid_until
                and second.valid_from < first.valid_until
                and first.shaping.canonical() != second.shaping.canonical()
            ):
                pairs.append((first, second))
    return pairs


def _refused_together(first: UsagePolicy, second: UsagePolicy, now: dt.datetime) -> str | None:
    """The decision library's reason for refusing a request both policies apply to, when
    the first alone would answer it (None: they do not conflict)."""
    member = sorted(set(first.members) & set(second.members))[0]
    dataset = sorted(set(first.datasets) & set(second.datasets))[0]
    purpose = sorted(set(first.purposes) & set(second.purposes))[0]
    start = max(first.valid_from, second.valid_from, now)
    if start >= min(first.valid_until, second.valid_until):
        return None  # they overlapped only in the past
    column = sorted(set(first.columns) & set(second.columns)) or [first.columns[0]]
    request = DecisionRequest(
        member, purpose, (dataset,), {dataset: frozenset(column[:1])}, False, start
    )
    try:
        alone = EmbeddedEngine([first]).decide(request)
        both = EmbeddedEngine([first, second]).decide(request)
    except PolicyEngineError:
        return None
    if both.allow or not alone.allow:
        return None
    return "; ".join(both.reasons)
