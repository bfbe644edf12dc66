"""Issue 18 over mTLS: a peer's SQL cannot stall the server; a hostile signature file cannot
keep a withdrawn grant in force. Against a real server with real certificates."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from connector.errors import ConnectorError, PermissionDenied, QueryRejected
from connector.jws import b64url
from connector.policy.signing import signature_path
from connector.sqlbounds import MAX_BRACKET_DEPTH, MAX_TOKENS
from tests.conftest import Member, ServerProcess, Space, policy_text, wait_for

NORMAL = "SELECT plant, sum(defects) AS n FROM part_defects GROUP BY plant"
PURPOSE = "quality-benchmarking"

# The worst inputs an attacker can send: the stall of issue 18 and what the scan lets through.
ATTACKS = [
    "SELECT t FROM" + "(" * 10_400,
    "SELECT t FROM " + "(" * 5_000 + ")" * 5_000,
    "SELECT " + "[" * 20_000,
    "SELECT " + ",".join(["(" * MAX_BRACKET_DEPTH + "1 1" + ")" * MAX_BRACKET_DEPTH] * 20),
    "SELECT " + "a," * ((MAX_TOKENS - 5) // 2) + "a FROM part_defects",
    "SELECT 1 FROM part_defects WHERE " + " AND ".join(["defects=1"] * (MAX_TOKENS // 4 - 2)),
    "SELECT plant FROM part_defects WHERE defects IN (" + "1," * (MAX_TOKENS // 2 - 12) + "1)",
]


def _timed_query(space: Space, sql: str) -> float:
    started = time.perf_counter()
    with space.peer() as peer:
        peer.query(sql, PURPOSE)
    return time.perf_counter() - started


@pytest.mark.slow
def test_a_normal_query_is_not_slowed_by_an_attacker_sending_the_worst_inputs(
    shared_space: Space,
) -> None:
    baseline = min(_timed_query(shared_space, NORMAL) for _ in range(3))
    stop = threading.Event()
    outcomes: list[tuple[float, str]] = []

    def attack() -> None:
        with shared_space.peer(shared_space.outsider) as peer:
            while not stop.is_set():
                for sql in ATTACKS:
                    started = time.perf_counter()
                    try:
                        peer.query(sql, PURPOSE)
                        outcome = "answered"
                    except QueryRejected:
                        outcome = "rejected"
                    except ConnectorError as exc:
                        outcome = type(exc).__name__
                    outcomes.append((time.perf_counter() - started, outcome))

    attackers = [threading.Thread(target=attack, daemon=True) for _ in range(2)]
    for attacker in attackers:
        attacker.start()
    try:
        wait_for(lambda: len(outcomes) >= 2)  # the attack is under way (no fixed sleep)
        during = [_timed_query(shared_space, NORMAL) for _ in range(5)]
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(timeout=60)
    # Before the fix one unclosed run of '(' held the parser for 46 s; a query beside it 7.5 s.
    assert max(during) < max(1.0, 5 * baseline), (baseline, during)
    assert outcomes, "the attacker got no answer at all"
    assert max(seconds for seconds, _ in outcomes) < 2.0, outcomes
    assert {outcome for _, outcome in outcomes} <= {"rejected", "PermissionDenied"}


@pytest.mark.parametrize("sql", ATTACKS[:3])
def test_the_stalling_inputs_are_refused_at_once(shared_space: Space, sql: str) -> None:
    started = time.perf_counter()
    with shared_space.peer() as peer, pytest.raises(QueryRejected, match=r"bracket|nested"):
        peer.query(sql, PURPOSE)
    assert time.perf_counter() - started < 1.0


def _nested_header_signature(depth: int = 5_000) -> str:
    return f"{b64url(('[' * depth + ']' * depth).encode())}..{b64url(bytes(64))}\n"


@pytest.mark.slow  # waits for the policy watcher's 2 s poll
def test_a_withdrawn_grant_is_not_answered_beside_a_nested_header_signature(
    space: Space,
) -> None:
    with space.peer() as peer:
        assert peer.query(NORMAL, PURPOSE).num_rows > 0
    policies = space.provider.home / "policies"
    # A second file whose signature header is deeply nested JSON (under the size limit).
    other = space.provider.write_policy(
        "other.yaml", policy_text("other", members="[supplier-b]"), sign=False
    )
    signature_path(other).write_text(_nested_header_signature())
    # The owner withdraws the grant: policy and signature deleted.
    withdrawn = policies / "quality.yaml"
    withdrawn.unlink()
    signature_path(withdrawn).unlink()

    def refused() -> bool:
        with space.peer() as peer:
            try:
                peer.query(NORMAL, PURPOSE)
            except PermissionDenied:
                return True
        return False

    wait_for(refused, timeout=20)
    assert space.server.provider.policies.snapshot.policies == ()


@pytest.mark.slow
def test_serve_starts_beside_a_nested_header_signature_and_says_why_it_is_skipped(
    make_member: Callable[[str], Member],
) -> None:
    provider = make_member("carmaker")
    bad = provider.write_policy("bad.yaml", policy_text("bad", members="[x]"), sign=False)
    signature_path(bad).write_text(_nested_header_signature())
    server = ServerProcess(provider.home)
    try:
        wait_for(lambda: "policy bad.yaml skipped" in server.log(), timeout=15)
        assert "nested more than" in server.log()
        assert server.process.poll() is None
    finally:
        server.close()
