"""The Rego decision library, run by both engines: default deny, reasons, grants, catalog.

The OPA-server backend is tested against a small OPA-compatible HTTP endpoint written here
(policy and data upload, data queries; evaluated with regopy): no OPA binary can be
installed on this machine.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from regopy import Bundle

from connector.errors import PolicyEngineError, PolicyEngineUnavailable
from connector.policy.engine import (
    DecisionRequest,
    EmbeddedEngine,
    OpaConnection,
    PolicyEngine,
    compiled_bundle,
    policy_data,
    rego_library,
)
from connector.policy.model import UsagePolicy, parse_policy
from connector.policy.opa import OpaLink, OpaServerEngine, build_engine
from connector.recent import RecentlyUsed
from tests.opa_endpoint import opa_endpoint

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def _policy(tmp_path: Path, pid: str, members: str, **terms: str) -> UsagePolicy:
    text = f"""\
id: {pid}
version: {terms.get("version", "1")}
description: test
datasets: {terms.get("datasets", "[part_defects]")}
grantees: {{members: {members}}}
purposes: {terms.get("purposes", "[quality]")}
valid: {{from: {terms.get("start", "2026-01-01")}, until: {terms.get("until", "2027-01-01")}}}
columns:
  allow: {terms.get("columns", "[plant, defects]")}
{terms.get("extra", "")}"""
    path = tmp_path / f"{pid}.yaml"
    path.write_text(text)
    return parse_policy(path)


def _variant(
    base: UsagePolicy,
    pid: str,
    *,
    members: tuple[str, ...] | None = None,
    datasets: tuple[str, ...] | None = None,
    purposes: tuple[str, ...] | None = None,
    columns_allow: tuple[str, ...] | None = None,
) -> UsagePolicy:
    """base with another id and lists: the policy its edited file parses to, without parsing.

    A policy file's YAML parse costs about 5 ms; tests that need hundreds of policies make
    them from one parsed base (its path and hash stay, which the engines do not read).
    """
    return dataclasses.replace(
        base,
        id=pid,
        members=base.members if members is None else members,
        datasets=base.datasets if datasets is None else datasets,
        purposes=base.purposes if purposes is None else purposes,
        columns_allow=base.columns_allow if columns_allow is None else columns_allow,
    )


def _parsed_alike(tmp_path: Path, made: UsagePolicy, members: str, **terms: str) -> UsagePolicy:
    """The policy _policy parses for made's id and terms, with made's path and hash."""
    parsed = _policy(tmp_path, made.id, members, **terms)
    return dataclasses.replace(parsed, path=made.path, sha256=made.sha256)


def _request(member: str, purpose: str = "quality", **columns: list[str]) -> DecisionRequest:
    datasets = tuple(sorted(columns)) or ("part_defects",)
    return DecisionRequest(
        member=member,
        purpose=purpose,
        datasets=datasets,
        columns={d: frozenset(c) for d, c in columns.items()},
        uses_star=False,
        time=NOW,
    )


@pytest.fixture
def opa_url() -> Iterator[str]:
    with opa_endpoint() as (url, _):
        yield url


EngineMaker = Callable[[list[UsagePolicy]], PolicyEngine]


@pytest.fixture(params=["embedded", "opa"])
def make_engine(request: pytest.FixtureRequest) -> EngineMaker:
    if request.param == "embedded":
        return EmbeddedEngine
    link = OpaLink(OpaConnection(request.getfixturevalue("opa_url"), "ctest"))
    return lambda policies: build_engine("opa", policies, opa=link)


def test_default_deny_without_policies(make_engine: EngineMaker) -> None:
    decision = make_engine([]).decide(_request("acme", part_defects=["plant"]))
    assert not decision.allow
    assert decision.reasons == ("no policy grants dataset part_defects to you",)
    assert decision.grants == ()


def test_grant_for_member_purpose_and_columns(tmp_path: Path, make_engine: EngineMaker) -> None:
    engine = make_engine([_policy(tmp_path, "p1", "[acme]")])
    decision = engine.decide(_request("acme", part_defects=["plant"]))
    assert decision.allow and decision.reasons == ()
    assert [(g.dataset, g.columns, g.policies) for g in decision.grants] == [
        ("part_defects", ("defects", "plant"), (("p1", 1),))
    ]


def test_reasons_for_purpose_and_column(tmp_path: Path, make_engine: EngineMaker) -> None:
    engine = make_engine([_policy(tmp_path, "p1", "[acme]")])
    purpose = engine.decide(_request("acme", "marketing", part_defects=["plant"]))
    assert purpose.reasons == (
        "purpose marketing is not allowed for dataset part_defects (allowed: quality)",
    )
    column = engine.decide(_request("acme", part_defects=["plant", "price"]))
    assert column.reasons == ("column price of dataset part_defects is not allowed",)
    assert not column.allow and column.grants == ()


def test_reasons_never_reveal_other_members_policies(
    tmp_path: Path, make_engine: EngineMaker
) -> None:
    engine = make_engine(
        [_policy(tmp_path, "secret-deal", "[rival]", purposes="[pricing]", columns="[price]")]
    )
    decision = engine.decide(_request("acme", "pricing", part_defects=["price"]))
    assert decision.reasons == ("no policy grants dataset part_defects to you",)
    assert engine.catalog("acme", NOW) == ()


def test_expired_and_not_yet_valid(tmp_path: Path, make_engine: EngineMaker) -> None:
    engine = make_engine(
        [
            _policy(tmp_path, "old", "[acme]", start="2025-01-01", until="2026-01-01"),
            _policy(tmp_path, "new", "[bob]", start="2026-09-01", until="2027-01-01"),
        ]
    )
    old = engine.decide(_request("acme", part_defects=["plant"]))
    assert old.reasons == (
        "policy old for dataset part_defects expired on 2026-01-01T00:00:00+00:00",
    )
    new = engine.decide(_request("bob", part_defects=["plant"]))
    assert new.reasons == (
        "policy new for dataset part_defects is valid only from 2026-09-01T00:00:00+00:00",
    )


def test_two_policies_grant_the_union_of_columns(tmp_path: Path, make_engine: EngineMaker) -> None:
    engine = make_engine(
        [
            _policy(tmp_path, "a", "[acme]", columns="[plant]"),
            _policy(tmp_path, "b", "[acme, bob]", columns="[defects, week]", version="4"),
        ]
    )
    decision = engine.decide(_request("acme", part_defects=["plant", "week"]))
    assert decision.allow
    (grant,) = decision.grants
    assert grant.columns == ("defects", "plant", "week")
    assert grant.policies == (("a", 1), ("b", 4))


def test_policies_that_shape_a_dataset_differently_are_refused_together(
    tmp_path: Path, make_engine: EngineMaker
) -> None:
    masked = "  mask: {part_no: hash}"
    engine = make_engine(
        [
            _policy(tmp_path, "clear", "[acme]", columns="[plant, part_no]"),
            _policy(tmp_path, "masked", "[acme]", columns="[plant]", extra=masked),
            _policy(tmp_path, "masked-too", "[bob]", columns="[defects]", extra=masked),
            _policy(tmp_path, "masked-also", "[bob]", columns="[plant]", extra=masked),
            _policy(tmp_path, "other", "[acme]", purposes="[audit]", extra=masked),
        ]
    )
    conflict = engine.decide(_request("acme", part_defects=["plant"]))
    assert not conflict.allow and conflict.grants == ()
    assert conflict.reasons == (
        "policies clear, masked all grant dataset part_defects to you for this purpose but "
        "with different masks, row filters or aggregate-only terms; the owner must merge them "
        "into one policy (or give them different purposes)",
    )
    # Alike shaping: the union of what each allows, masked columns included.
    alike = engine.decide(_request("bob", part_defects=["plant", "part_no", "defects"]))
    assert alike.allow
    assert alike.grants[0].columns == ("defects", "part_no", "plant")
    # Another purpose: only that purpose's policy applies, so there is nothing to merge.
    assert engine.decide(_request("acme", "audit", part_defects=["part_no"])).allow


def test_every_dataset_needs_a_grant(tmp_path: Path, make_engine: EngineMaker) -> None:
    engine = make_engine([_policy(tmp_path, "p1", "[acme]")])
    decision = engine.decide(_request("acme", part_defects=["plant"], prices=[]))
    assert decision.reasons == ("no policy grants dataset prices to you",)


def test_a_query_reading_no_dataset_is_denied(make_engine: EngineMaker) -> None:
    request = DecisionRequest("acme", "quality", (), {}, False, NOW)
    assert make_engine([]).decide(request).reasons == ("the query must read at least one dataset",)


def test_catalog_lists_what_is_granted_now(tmp_path: Path, make_engine: EngineMaker) -> None:
    engine = make_engine(
        [
            _policy(tmp_path, "a", "[acme]", columns="[plant]", purposes="[quality]"),
            _policy(tmp_path, "b", "[acme]", columns="[week]", purposes="[planning]"),
            _policy(tmp_path, "c", "[acme]", datasets="[other]", until="2026-02-01"),
        ]
    )
    (entry,) = engine.catalog("acme", NOW)
    assert entry.dataset == "part_defects"
    assert entry.columns == ("plant", "week")
    assert entry.purposes == ("planning", "quality")
    assert entry.policies == (("a", 1), ("b", 1))


def test_embedded_engine_is_safe_across_threads(tmp_path: Path) -> None:
    engine = EmbeddedEngine([_policy(tmp_path, "p1", "[acme]")])
    failures: list[BaseException] = []

    def ask(member: str) -> None:
        try:
            for _ in range(50):
                decision = engine.decide(_request(member, part_defects=["plant"]))
                assert decision.allow is (member == "acme")
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=ask, args=(m,)) for m in ("acme", "bob") * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_broken_rego_fails_closed() -> None:
    with pytest.raises(PolicyEngineError, match="does not compile"):
        EmbeddedEngine([], library="package connector.authz\n this is not rego")


def test_unreachable_opa_server_refuses_as_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    engine = OpaServerEngine([], OpaLink(OpaConnection("http://127.0.0.1:1", "ctest", timeout=0.5)))
    with pytest.raises(PolicyEngineUnavailable, match="could not be pushed") as error:
        engine.decide(_request("acme", part_defects=["plant"]))
    # The owner's record names the server (the service shows the peer a text of its own).
    assert "the OPA server at http://127.0.0.1:1 cannot decide" in str(error.value)
    assert "127.0.0.1:1" in caplog.text


def test_obligations_of_every_policy_used_travel_with_the_decision(
    tmp_path: Path, make_engine: EngineMaker
) -> None:
    def with_obligations(pid: str, obligations: str, **terms: str) -> UsagePolicy:
        policy = _policy(tmp_path, pid, "[acme]", **terms)
        policy.path.write_text(policy.path.read_text() + f"obligations: {obligations}\n")
        return parse_policy(policy.path)

    engine = make_engine(
        [
            with_obligations("a", "{delete_within_days: 90, attribution: 'Source: A'}"),
            with_obligations("b", "{delete_within_days: 30, terms: [no resale]}", columns="[week]"),
            with_obligations("c", "{delete_within_days: 1}", datasets="[other]"),
        ]
    )
    decision = engine.decide(_request("acme", part_defects=["plant", "week"]))
    assert decision.allow
    assert decision.obligations == {
        "delete_within_days": 30,
        "attribution": ["Source: A"],
        "terms": ["no resale"],
    }


def test_an_out_of_date_policy_for_another_purpose_opens_nothing(
    tmp_path: Path, make_engine: EngineMaker
) -> None:
    # The member's only policy for prices has expired and was for another purpose: no
    # purpose, expiry or column reason fits, and the query must still be denied, with a reason.
    engine = make_engine(
        [
            _policy(tmp_path, "p1", "[acme]"),
            _policy(
                tmp_path,
                "old",
                "[acme]",
                datasets="[prices]",
                purposes="[audit]",
                until="2026-03-01",
            ),
        ]
    )
    both = engine.decide(_request("acme", part_defects=["plant"], prices=["plant"]))
    assert not both.allow and both.grants == ()
    assert both.reasons == (
        "purpose quality is not allowed for dataset prices "
        "(none of your policies for it is in force now)",
    )
    assert engine.decide(_request("acme", prices=["plant"])).reasons == both.reasons


@pytest.mark.slow
def test_decision_cost_follows_the_requesters_policies_not_all_policies(tmp_path: Path) -> None:
    # regopy recomputes function calls and compares whole objects in sets: with 150 policies
    # naming the requester a decision took 4 s, before the library computed each set once,
    # over policy positions, from an index of the requester's policies (0.15 s after).
    base = _policy(tmp_path, "base", "[acme]")
    theirs = [
        _variant(base, f"o{i}", members=(f"m{i % 50}",), columns_allow=("plant", f"c{i}"))
        for i in range(300)
    ]
    mine = [_variant(base, f"a{i}", columns_allow=("plant", f"c{i}")) for i in range(150)]
    assert theirs[7] == _parsed_alike(tmp_path, theirs[7], "[m7]", columns="[plant, c7]")
    assert mine[9] == _parsed_alike(tmp_path, mine[9], "[acme]", columns="[plant, c9]")
    engine = EmbeddedEngine(theirs + mine)
    started = time.thread_time()  # this thread's CPU time: a busy machine does not count
    decision = engine.decide(_request("acme", part_defects=["plant", "c99"]))
    catalog = engine.catalog("acme", NOW)
    assert time.thread_time() - started < 1.0  # 0.15 s here; 4.3 s before
    assert decision.allow
    (grant,) = decision.grants
    assert len(grant.policies) == 150 and len(grant.columns) == 151
    assert [entry.dataset for entry in catalog] == ["part_defects"]


def test_a_compiled_library_serves_exactly_the_policies_it_was_compiled_with(
    tmp_path: Path,
) -> None:
    # Engines over the same policies share one compiled library; any change in a policy
    # (here one more column in version 2) compiles again, never reuses the old one.
    first = [_policy(tmp_path, "a", "[acme]")]
    widened = [_policy(tmp_path, "a", "[acme]", version="2", columns="[plant, defects, cost]")]
    asked = _request("acme", part_defects=["plant", "cost"])
    assert not EmbeddedEngine(first).decide(asked).allow
    assert EmbeddedEngine(widened).decide(asked).allow
    assert not EmbeddedEngine(first).decide(asked).allow
    assert EmbeddedEngine(widened).decide(asked).allow

    kept: RecentlyUsed[tuple[str, str], Bundle] = RecentlyUsed(1)
    library, one, two = rego_library(), policy_data(first), policy_data(widened)
    made = compiled_bundle(library, one, kept)
    assert compiled_bundle(library, one, kept) is made
    assert compiled_bundle(library, two, kept) is not made
    assert compiled_bundle(library, one, kept) is not made  # only the last set is kept
    changed = compiled_bundle(library + "\n# changed\n", one, kept)
    assert changed is not compiled_bundle(library, one, kept)


def _plain_reading(policies: list[UsagePolicy], request: DecisionRequest) -> dict[str, Any]:
    """What the Rego library must decide, written plainly in Python."""

    def applicable(dataset: str) -> list[UsagePolicy]:
        return [
            p
            for p in policies
            if request.member in p.members
            and dataset in p.datasets
            and request.purpose in p.purposes
            and p.valid_from <= request.time < p.valid_until
        ]

    grants = {}
    for dataset in request.datasets:
        found = applicable(dataset)
        columns = {c for p in found for c in p.columns_allow}
        if not found or not request.columns.get(dataset, frozenset()) <= columns:
            return {"allow": False}
        grants[dataset] = (tuple(sorted(columns)), tuple(sorted((p.id, p.version) for p in found)))
    return {"allow": bool(request.datasets), "grants": grants}


def test_random_requests_agree_with_a_plain_reading_and_never_leak(tmp_path: Path) -> None:
    rng = random.Random(20261125)
    members, datasets = ["acme", "bob", "carl"], ["d1", "d2", "d3"]
    purposes, columns = ["quality", "planning", "audit"], ["c1", "c2", "c3", "c4"]
    days = ["2025-06-01", "2026-01-01", "2026-06-01", "2027-01-01"]
    # One parsed policy per validity period; the rest are its variants (see _variant).
    periods: dict[tuple[str, str], UsagePolicy] = {}
    checked = False
    for round_no in range(20):
        policies = []
        for i in range(rng.randint(0, 8)):
            start, end = sorted(rng.sample(days, 2))
            if (start, end) not in periods:
                periods[start, end] = _policy(tmp_path, "base", "[acme]", start=start, until=end)
            policies.append(
                _variant(
                    periods[start, end],
                    f"r{round_no}-p{i}",
                    members=tuple(rng.sample(members, rng.randint(1, 2))),
                    datasets=tuple(rng.sample(datasets, rng.randint(1, 2))),
                    purposes=tuple(rng.sample(purposes, rng.randint(1, 2))),
                    columns_allow=tuple(rng.sample(columns, rng.randint(1, 3))),
                )
            )
        if policies and not checked:  # the variants are what their files would parse to
            checked, made = True, policies[0]
            assert made == _parsed_alike(
                tmp_path,
                made,
                f"[{', '.join(made.members)}]",
                datasets=f"[{', '.join(made.datasets)}]",
                purposes=f"[{', '.join(made.purposes)}]",
                columns=f"[{', '.join(made.columns_allow)}]",
                start=made.valid_from.date().isoformat(),
                until=made.valid_until.date().isoformat(),
            )
        engine = EmbeddedEngine(policies)
        for _ in range(15):
            asked = tuple(sorted(rng.sample(datasets, 1 if rng.random() < 0.7 else 2)))
            request = DecisionRequest(
                member=rng.choice(members),
                purpose=rng.choice(purposes),
                datasets=asked,
                columns={d: frozenset(rng.sample(columns, rng.randint(0, 1))) for d in asked},
                uses_star=False,
                time=NOW,
            )
            decision = engine.decide(request)
            expected = _plain_reading(policies, request)
            assert decision.allow is expected["allow"], (policies, request, decision)
            if decision.allow:
                got = {g.dataset: (g.columns, g.policies) for g in decision.grants}
                assert got == expected["grants"]
                continue
            assert decision.reasons, (policies, request)
            # Nothing in a reason may come only from policies that do not name the requester.
            mine = [p for p in policies if request.member in p.members]
            known = {
                request.purpose,
                *request.datasets,
                *(c for s in request.columns.values() for c in s),
            }
            known |= {x for p in mine for x in (p.id, *p.purposes, *p.columns_allow, *p.datasets)}
            foreign = {
                x for p in policies if p not in mine for x in (p.id, *p.purposes, *p.columns_allow)
            } - known
            words = set(re.findall(r"[\w.-]+", " ".join(decision.reasons)))
            assert not words & foreign, (decision.reasons, foreign)
