"""The fast control path over mutual TLS: cached decisions never outlive the policies,
revocations or dates they were taken under, and queries over the slot limit wait in a
bounded queue (each refusal on record) instead of being refused at once."""

from __future__ import annotations

import dataclasses
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.audit_chain import read_entries
from connector.config import load_settings
from connector.errors import (
    NotAuthenticated,
    PeerError,
    PermissionDenied,
    QueryRejected,
    ResourceExhausted,
)
from connector.identity import MemberIdentity
from connector.request import PeerRequest
from connector.server import RunningServer
from connector.store import ColumnInfo
from tests.conftest import Member, Space, copied_space, home_put_back, policy_text

PURPOSE = "quality-benchmarking"
QUERY = "SELECT plant, defects FROM part_defects LIMIT 1"


@pytest.fixture(scope="module")
def own_space(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> Space:
    """This module's space: its tests change policies and revocations, and put them back."""
    return copied_space(module_dir / "space", dataspace, module_serve)


@pytest.fixture
def restored(own_space: Space) -> Iterator[Space]:
    """own_space, its policies, connector.toml and slot settings put back afterwards."""
    slots = own_space.server.provider.slots
    queue = (slots.queue_length, slots.queue_seconds)
    try:
        with home_put_back(own_space):
            yield own_space
    finally:
        slots.queue_length, slots.queue_seconds = queue


def _warm(space: Space) -> None:
    """Query until the decision comes from the cache."""
    decisions = space.server.provider.decisions
    with space.peer() as peer:
        before = decisions.hits
        for _ in range(2):
            assert peer.query(QUERY, PURPOSE).num_rows == 1
    assert decisions.hits > before


def _entries(member: Member) -> list[dict[str, Any]]:
    return [
        e
        for e in read_entries(load_settings(member.home).audit_log)
        if e.get("kind") == "query" and e.get("type") == "request"
    ]


def test_a_withdrawn_grant_is_refused_right_after_reload_with_a_warm_cache(
    restored: Space,
) -> None:
    _warm(restored)
    (restored.provider.home / "policies" / "quality.yaml").unlink()
    restored.server.provider.policies.reload()  # what the watcher does on a file change
    with restored.peer() as peer, pytest.raises(PermissionDenied):
        peer.query(QUERY, PURPOSE)


def test_a_narrowed_grant_refuses_the_dropped_column_right_after_reload(restored: Space) -> None:
    _warm(restored)
    (restored.provider.home / "policies" / "quality.yaml").unlink()
    restored.provider.write_policy(
        "narrow.yaml",
        policy_text("quality-narrow", members="[supplier-a]", columns="[plant, week]"),
    )
    restored.server.reload()
    with restored.peer() as peer:
        with pytest.raises(PermissionDenied):
            peer.query(QUERY, PURPOSE)  # reads defects, no longer granted
        assert peer.query("SELECT plant FROM part_defects LIMIT 1", PURPOSE).num_rows == 1


def test_a_revoked_member_is_refused_right_after_reload_with_a_warm_cache(
    restored: Space,
) -> None:
    _warm(restored)
    config = restored.provider.home / "connector.toml"
    config.write_text(config.read_text().replace("members = []", 'members = ["supplier-a"]'))
    restored.server.reload()
    hits = restored.server.provider.decisions.hits
    with restored.peer() as peer, pytest.raises(NotAuthenticated):
        peer.query(QUERY, PURPOSE)
    assert restored.server.provider.decisions.hits == hits


def test_a_cached_grant_ends_at_the_policys_expiry_and_not_before_its_start(
    own_space: Space,
) -> None:
    provider = own_space.server.provider
    member = MemberIdentity(provider.dataspace, "supplier-a", "supplier-a", 0)
    request = PeerRequest.checked(QUERY, PURPOSE, 0, "")
    shape = provider.guard(QUERY)
    policy = provider.policies.snapshot.by_id["quality-benchmark"]
    now = dt.datetime.now(dt.UTC)
    assert provider.decide(member, request, shape, now).allow
    assert provider.decide(member, request, shape, now).allow  # from the cache
    second = dt.timedelta(seconds=1)
    assert provider.decide(member, request, shape, policy.valid_until - second).allow
    # The same request under the same snapshot, after expiry and before the start: no grant.
    assert not provider.decide(member, request, shape, policy.valid_until).allow
    assert not provider.decide(member, request, shape, policy.valid_from - second).allow
    assert provider.decide(member, request, shape, policy.valid_from).allow


def test_the_decision_cache_tells_members_and_purposes_apart(own_space: Space) -> None:
    provider = own_space.server.provider
    request = PeerRequest.checked(QUERY, PURPOSE, 0, "")
    other_purpose = PeerRequest.checked(QUERY, "marketing", 0, "")
    shape = provider.guard(QUERY)
    now = dt.datetime.now(dt.UTC)
    grantee = MemberIdentity(provider.dataspace, "supplier-a", "supplier-a", 0)
    outsider = MemberIdentity(provider.dataspace, "supplier-b", "supplier-b", 0)
    assert provider.decide(grantee, request, shape, now).allow
    assert not provider.decide(outsider, request, shape, now).allow
    assert not provider.decide(grantee, other_purpose, shape, now).allow
    hidden = provider.guard("SELECT plant, supplier_price FROM part_defects LIMIT 1")
    assert not provider.decide(grantee, request, hidden, now).allow  # a column not granted


def _query_in_thread(space: Space, outcome: list[object]) -> threading.Thread:
    def ask() -> None:
        try:
            with space.peer() as peer:
                outcome.append(peer.query(QUERY, PURPOSE).num_rows)
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=ask)
    thread.start()
    return thread


def test_a_query_over_the_limit_waits_for_a_slot_instead_of_being_refused(
    restored: Space,
) -> None:
    slots = restored.server.provider.slots
    held = [slots.acquire("supplier-a") for _ in range(slots.per_member)]
    outcome: list[object] = []
    thread = _query_in_thread(restored, outcome)
    deadline = time.monotonic() + 10
    while slots.waiting() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slots.waiting() == 1 and not outcome  # queued, not refused
    held[0].finish()
    thread.join(10)
    for slot in held[1:]:
        slot.finish()
    assert outcome == [1]


def test_queue_refusals_are_on_record(restored: Space) -> None:
    slots = restored.server.provider.slots
    held = [slots.acquire("supplier-a") for _ in range(slots.per_member)]
    try:
        slots.queue_seconds = 0.2
        before = len(_entries(restored.provider))
        with restored.peer() as peer:
            started = time.monotonic()
            with pytest.raises(ResourceExhausted, match="at once"):
                peer.query(QUERY, PURPOSE)  # waited its time in the queue
            assert time.monotonic() - started >= 0.2
            slots.queue_length = 0
            started = time.monotonic()
            with pytest.raises(ResourceExhausted, match="queue of waiting queries is full"):
                peer.query(QUERY, PURPOSE)  # the queue is full: refused at once
            assert time.monotonic() - started < 0.2
    finally:
        for slot in held:
            slot.finish()
    refused = _entries(restored.provider)[before:]
    assert [e["outcome"] for e in refused] == ["exhausted", "exhausted"]


def test_the_client_checks_a_changed_provider_proof_again(own_space: Space) -> None:
    with own_space.peer() as peer:
        assert peer.query(QUERY, PURPOSE).num_rows == 1
        assert peer.query(QUERY, PURPOSE).num_rows == 1  # the proof checked once, kept
        endorsement, certificate = peer._provider_proof or ("", "")
        # Another member's certificate with this provider's endorsement: refused, not
        # taken from what was checked for the true pair.
        other = (own_space.grantee.home / "tls" / "cert.pem").read_text()
        peer._provider_proof = (endorsement, other)
        with pytest.raises(PeerError, match="does not verify"):
            peer.query(QUERY, PURPOSE)
        peer._provider_proof = (endorsement[:-4] + "AAAA", certificate)
        with pytest.raises(PeerError, match="does not verify"):
            peer.query(QUERY, PURPOSE)
        peer._provider_proof = (endorsement, certificate)
        assert peer.query(QUERY, PURPOSE).num_rows == 1


@dataclasses.dataclass(frozen=True)
class _StandIn:
    dataset: str
    columns: tuple[ColumnInfo, ...]


def test_a_name_check_passed_once_is_made_again_for_other_stand_ins(own_space: Space) -> None:
    sandbox = own_space.server.provider.sandbox
    sql = "SELECT plant, defects FROM part_defects"
    both = _StandIn(
        "part_defects", (ColumnInfo("plant", "VARCHAR"), ColumnInfo("defects", "BIGINT"))
    )
    narrow = _StandIn("part_defects", (ColumnInfo("plant", "VARCHAR"),))
    for _ in range(2):
        sandbox.check_names(sql, [both], ["part_defects"])
    with pytest.raises(PermissionDenied):
        sandbox.check_names(sql, [narrow], ["part_defects"])
    with pytest.raises(QueryRejected, match="not a dataset"):
        sandbox.check_names(sql, [], ["part_defects"])


def test_a_cached_decision_cannot_be_changed_through_what_a_caller_got(
    own_space: Space,
) -> None:
    provider = own_space.server.provider
    member = MemberIdentity(provider.dataspace, "supplier-a", "supplier-a", 0)
    request = PeerRequest.checked(QUERY, PURPOSE, 0, "")
    shape = provider.guard(QUERY)
    now = dt.datetime.now(dt.UTC)
    provider.decide(member, request, shape, now)
    first = provider.decide(member, request, shape, now)  # from the cache
    assert first.obligations, "the test needs a decision with obligations"
    for value in first.obligations.values():
        if isinstance(value, list):
            value.append("tampered")
    assert isinstance(first.obligations, dict)
    first.obligations["tampered"] = True
    again = provider.decide(member, request, shape, now)
    assert "tampered" not in repr(again.obligations)
    assert any(isinstance(v, list) for v in again.obligations.values()), "nested lists too"
