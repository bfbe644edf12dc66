"""An engine's answer is obeyed only as far as the signed policies it names allow."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from connector.errors import PolicyEngineError
from connector.policy.engine import (
    CatalogGrant,
    CheckedEngine,
    Decision,
    DecisionRequest,
    Grant,
)
from tests.unit.test_policy_engine import NOW, _policy, _request


class ScriptedEngine:
    """An engine that answers what the test tells it to (as a lying OPA would)."""

    def __init__(self, decision: Decision, catalog: tuple[CatalogGrant, ...] = ()) -> None:
        self.decision = decision
        self.entries = catalog

    def decide(self, request: DecisionRequest) -> Decision:
        return self.decision

    def catalog(self, member: str, time: dt.datetime) -> tuple[CatalogGrant, ...]:
        return self.entries


def _allow(*grants: Grant) -> Decision:
    return Decision(True, (), grants)


GOOD = Grant("part_defects", ("plant",), (("p1", 1),))


@pytest.mark.parametrize(
    ("grant", "request_member", "purpose"),
    [
        (Grant("part_defects", ("plant", "secret"), (("p1", 1),)), "acme", "quality"),
        (Grant("part_defects", ("plant",), (("p1", 2),)), "acme", "quality"),
        (Grant("part_defects", ("plant",), (("nobody", 1),)), "acme", "quality"),
        (Grant("part_defects", ("plant",), ()), "acme", "quality"),
        (GOOD, "other", "quality"),
        (GOOD, "acme", "marketing"),
        (Grant("other_dataset", ("plant",), (("p1", 1),)), "acme", "quality"),
        # A policy for another purpose cannot lend its columns to this one.
        (Grant("part_defects", ("plant", "defects"), (("p1", 1), ("p2", 1))), "acme", "quality"),
        (Grant("part_defects", ("plant",), (("old", 1),)), "acme", "quality"),
    ],
    ids=[
        "a column no policy names",
        "another version",
        "an unknown policy",
        "no policy at all",
        "another member",
        "another purpose",
        "a dataset the query does not read",
        "columns of a policy for another purpose",
        "an expired policy",
    ],
)
def test_an_answer_beyond_the_signed_policies_is_a_denial_until_reload(
    tmp_path: Path, grant: Grant, request_member: str, purpose: str
) -> None:
    policies = [
        _policy(tmp_path, "p1", "[acme]", columns="[plant]"),
        _policy(tmp_path, "p2", "[acme]", columns="[plant, defects]", purposes="[audit]"),
        _policy(tmp_path, "old", "[acme]", columns="[plant]", until="2026-02-01"),
    ]
    inner = ScriptedEngine(_allow(grant))
    engine = CheckedEngine(inner, policies)
    request = _request(request_member, purpose, part_defects=["plant"])
    with pytest.raises(PolicyEngineError, match="cannot trust"):
        engine.decide(request)
    inner.decision = _allow(GOOD)  # even a good answer now: untrusted until a new engine
    with pytest.raises(PolicyEngineError, match="not trusted"):
        engine.decide(_request("acme", "quality", part_defects=["plant"]))
    assert CheckedEngine(inner, policies).decide(_request("acme", part_defects=["plant"])).allow


def test_a_catalog_listing_more_than_the_policies_is_refused(tmp_path: Path) -> None:
    policies = [_policy(tmp_path, "p1", "[acme]", columns="[plant]")]
    wide = CatalogGrant("part_defects", ("plant", "secret"), ("quality",), (("p1", 1),), NOW, NOW)
    engine = CheckedEngine(ScriptedEngine(_allow(GOOD), (wide,)), policies)
    with pytest.raises(PolicyEngineError):
        engine.catalog("acme", NOW)
    honest = CatalogGrant("part_defects", ("plant",), ("quality",), (("p1", 1),), NOW, NOW)
    assert CheckedEngine(ScriptedEngine(_allow(GOOD), (honest,)), policies).catalog("acme", NOW)
