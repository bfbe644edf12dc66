"""Fair share over mutual TLS: one member cannot hold every query slot.

supplier-a opens many large streams and never reads them: it gets at most its per-member
share, supplier-b is still answered, and the unread streams are ended after the stall time,
on record as `stalled`, their slots free again. Peers that give up free their slot at once,
not when DuckDB notices the interrupt.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from connector._proto.connector.v1 import connector_pb2 as pb
from connector.audit_chain import read_entries
from connector.client import Peer
from connector.config import load_settings
from connector.errors import ConfigError, QueryTimeout
from connector.server import RunningServer
from tests.conftest import (
    Member,
    connect,
    from_template,
    policy_text,
    wait_for,
    write_defects_csv,
)

PURPOSE = "quality-benchmarking"
# About 8 million rows: far more than any flow-control window, so an unread stream stalls.
HUGE = "SELECT a.part_no, b.plant, c.week FROM part_defects a, part_defects b, part_defects c"
# Seconds of work in one DuckDB vector: DuckDB notices an interrupt only when it is done.
# Slow whatever the machine (200^4 row combinations), and within the guard's value sizes.
SLOW = (
    "SELECT count(*) FROM part_defects a, part_defects b, part_defects c, part_defects d "
    "WHERE hash(a.week, b.week, c.week, d.week) = 42"
)


def _homes(directory: Path, make: Callable[[str], Member]) -> list[Member]:
    """carmaker with part_defects and policy q for both suppliers; supplier-a, supplier-b."""
    provider, first, second = (make(m) for m in ("carmaker", "supplier-a", "supplier-b"))
    provider.ingest(write_defects_csv(directory / "d.csv"), "part_defects")
    provider.write_policy("q.yaml", policy_text("q", members="[supplier-a, supplier-b]"))
    return [provider, first, second]


def _provider(
    tmp_path: Path,
    dataspace: Path,
    server_settings: dict[str, str],
) -> tuple[Member, Member, Member]:
    """A copy of _homes (built once a session) for one test, its server settings edited."""
    provider, first, second = from_template(tmp_path, dataspace, "fair-share", _homes)
    config = provider.home / "connector.toml"
    text = config.read_text().replace("batch_rows = 65536", "batch_rows = 1000")
    for old, new in server_settings.items():
        assert old in text, old
        text = text.replace(old, new)
    config.write_text(text)
    return provider, first, second


def _query_entries(provider: Member) -> list[dict[str, Any]]:
    log = load_settings(provider.home).audit_log
    return [e for e in read_entries(log) if e.get("kind") == "query" and e.get("type") == "request"]


@pytest.mark.slow
def test_one_member_cannot_hold_every_slot_and_unread_streams_end(
    tmp_path: Path,
    dataspace: Path,
    serve: Callable[[Member], RunningServer],
) -> None:
    provider, attacker, other = _provider(
        tmp_path,
        dataspace,
        {
            "max_concurrent_queries = 8": "max_concurrent_queries = 4",
            "stall_seconds = 30": "stall_seconds = 1.5",
            # Over its share the attacker's queries wait only briefly (the queue's own
            # tests are in tests/integration/test_control_path.py).
            "queue_seconds = 5 ": "queue_seconds = 0.5 ",
        },
    )
    server = serve(provider)
    peers = [connect(server, attacker, timeout=60) for _ in range(8)]
    calls = [
        p._stub.Query(pb.QueryRequest(sql=HUGE, purpose=PURPOSE), timeout=60) for p in peers
    ]  # started, never read
    try:
        wait_for(lambda: sum(call.done() for call in calls) == 6)
        refused = [call.code().name for call in calls if call.done()]
        assert refused == ["RESOURCE_EXHAUSTED"] * 6
        assert server.provider.slots.in_use("supplier-a") == 2
        with connect(server, other) as peer:
            answered = peer.fetch("SELECT count(*) FROM part_defects", PURPOSE)
        assert answered.receipt.rows == 1
        started = time.monotonic()
        # The client shows the end only once it reads; the server has let go already.
        wait_for(lambda: server.provider.slots.in_use() == 0)
        assert 1.0 < time.monotonic() - started < 10
    finally:
        for call in calls:
            call.cancel()
        for peer in peers:
            peer.close()

    def ended_entries() -> list[dict[str, Any]]:
        entries = [e for e in _query_entries(provider) if e["member_id"] == "supplier-a"]
        return [e for e in entries if e["outcome"] in ("stalled", "cancelled")]

    # The slot is free at once; the stream's final entry follows when its handler unwinds.
    # Under a loaded test run the client's own cancel (below) can reach a handler before the
    # stall watch's does: then it is on record as cancelled. Both streams are on record, and
    # the stall watch ended at least one of them.
    wait_for(lambda: len(ended_entries()) == 2, timeout=45)
    entries = [e for e in _query_entries(provider) if e["member_id"] == "supplier-a"]
    stalled = [e for e in ended_entries() if e["outcome"] == "stalled"]
    assert stalled, ended_entries()
    assert all("stopped reading" in e["reasons"][0] for e in stalled)
    assert sum(e["outcome"] == "exhausted" for e in entries) == 6
    with connect(server, attacker) as peer:  # the attacker's own slots are free again
        assert peer.fetch("SELECT count(*) FROM part_defects", PURPOSE).receipt.rows == 1


@pytest.mark.slow
def test_a_peer_that_gives_up_frees_its_slot_at_once(
    tmp_path: Path,
    dataspace: Path,
    serve: Callable[[Member], RunningServer],
) -> None:
    provider, first, second = _provider(
        tmp_path, dataspace, {"max_concurrent_queries = 8": "max_concurrent_queries = 1"}
    )
    server = serve(provider)
    peak, queued = [0], [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak[0] = max(peak[0], server.provider.slots.executing())
            queued[0] = max(queued[0], server.provider.slots.waiting())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outcomes = []
    try:
        # Four peers, two of each member: if DuckDB took seconds to notice an interrupt (the
        # premise of SLOW), the third would start while two still stop (peak), and each
        # would find the one slot taken unless giving up freed it.
        for i in range(4):
            with Peer(
                f"127.0.0.1:{server.port}", (first if i % 2 else second).identity(), timeout=0.4
            ) as peer:
                try:
                    peer.fetch(SLOW, PURPOSE)
                    outcomes.append("answered")
                except QueryTimeout:
                    outcomes.append("gave up")
                except Exception as exc:
                    outcomes.append(type(exc).__name__)
    finally:
        stop.set()
        sampler.join()
    assert outcomes == ["gave up"] * 4
    assert queued[0] == 0  # each found the slot its predecessor gave up free, not taken
    assert peak[0] <= 2  # DuckDB never runs more than twice the slots, stopping ones included
    wait_for(lambda: len(_query_entries(provider)) == 4)
    ended = [e["outcome"] for e in _query_entries(provider)]
    assert set(ended) <= {"timeout", "cancelled"}, ended
    with connect(server, first) as peer:
        assert peer.fetch("SELECT count(*) FROM part_defects", PURPOSE).receipt.rows == 1
    wait_for(lambda: server.provider.slots.executing() == 0)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("max_concurrent_queries_per_member = 9", "must not exceed max_concurrent_queries"),
        ("max_concurrent_queries_per_member = 0", "from 1 to"),
        ("stall_seconds = 0", "from 0.1 to"),
    ],
)
def test_fair_share_settings_are_checked(
    make_member: Callable[[str], Member], setting: str, message: str
) -> None:
    member = make_member("carmaker")
    config = member.home / "connector.toml"
    text = config.read_text()
    key = setting.split(" = ", maxsplit=1)[0]
    lines = [line for line in text.splitlines() if not line.startswith(key + " ")]
    config.write_text("\n".join(lines).replace("[server]", f"[server]\n{setting}", 1) + "\n")
    with pytest.raises(ConfigError, match=message):
        load_settings(member.home)
