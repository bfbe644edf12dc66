"""Check a decision engine's answer against the signed policies it names.

The Rego library decides, but an answer is obeyed only as far as the signed policies it
rests on allow: every grant must name policies that are in force, that name the member, the
purpose and the dataset, that grant every column given, and that shape the dataset alike.
An answer that grants more is an engine fault (an OPA server overwritten or lying), never a
grant: the caller denies and says so in the log.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from connector.policy.model import UsagePolicy


class GrantShape(Protocol):
    """What is checked (and enforced) of one grant in an answer."""

    @property
    def dataset(self) -> str: ...
    @property
    def columns(self) -> tuple[str, ...]: ...
    @property
    def policies(self) -> tuple[tuple[str, int], ...]: ...


@dataclass(frozen=True)
class AnswerFault:
    """Why an engine's answer cannot be obeyed (for the owner's log, never the peer)."""

    detail: str


def decision_grant_fault(
    grant: GrantShape,
    member: str,
    purpose: str,
    policies: Mapping[str, UsagePolicy],
    now: dt.datetime,
) -> AnswerFault | None:
    """Why a decision's grant goes beyond the signed policies it names (None when it does
    not): each named policy must also allow the request's purpose."""
    named = _named_policies(grant, member, policies, now)
    if isinstance(named, AnswerFault):
        return named
    for policy in named:
        if purpose not in policy.purposes:
            return AnswerFault(f"{policy.id}@{policy.version} does not allow purpose {purpose}")
    return _columns_and_shaping_fault(grant, named)


def catalog_grant_fault(
    grant: GrantShape,
    member: str,
    purposes: Iterable[str],
    policies: Mapping[str, UsagePolicy],
    now: dt.datetime,
) -> AnswerFault | None:
    """Why a catalog entry goes beyond the signed policies it names (None when it does
    not): every purpose listed must be allowed by one of them."""
    named = _named_policies(grant, member, policies, now)
    if isinstance(named, AnswerFault):
        return named
    listed = set(purposes) - {p for policy in named for p in policy.purposes}
    if listed:
        return AnswerFault(f"a catalog entry of {grant.dataset} lists purposes {sorted(listed)}")
    granted = {c for policy in named for c in policy.columns}
    extra = set(grant.columns) - granted
    if extra:
        return AnswerFault(f"a catalog entry of {grant.dataset} lists columns {sorted(extra)}")
    return None


def _named_policies(
    grant: GrantShape, member: str, policies: Mapping[str, UsagePolicy], now: dt.datetime
) -> list[UsagePolicy] | AnswerFault:
    if not grant.policies:
        return AnswerFault(f"a grant of {grant.dataset} names no policy")
    named: list[UsagePolicy] = []
    for policy_id, version in grant.policies:
        policy = policies.get(policy_id)
        if policy is None or policy.version != version:
            return AnswerFault(
                f"a grant of {grant.dataset} names {policy_id}@{version}, not in force"
            )
        if member not in policy.members or grant.dataset not in policy.datasets:
            return AnswerFault(
                f"{policy_id}@{version} does not grant {grant.dataset} to member {member}"
            )
        if not policy.valid_from <= now < policy.valid_until:
            return AnswerFault(f"{policy_id}@{version} is not valid now")
        named.append(policy)
    return named


def _columns_and_shaping_fault(grant: GrantShape, named: list[UsagePolicy]) -> AnswerFault | None:
    granted = {c for policy in named for c in policy.columns}
    extra = set(grant.columns) - granted
    if extra:
        return AnswerFault(
            f"a grant of {grant.dataset} gives columns {sorted(extra)} no policy names"
        )
    if len({policy.shaping.canonical() for policy in named}) != 1:
        return AnswerFault(f"the policies of a grant of {grant.dataset} shape it differently")
    return None
