"""Policy limits end to end: rows per query, daily queries and rows, across a restart."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import pytest

from connector.audit_chain import read_entries
from connector.config import load_settings
from connector.errors import ResourceExhausted
from connector.quota import QuotaLedger
from connector.server import RunningServer, start_server
from tests.conftest import Member, ProviderPair, connect, run_cli

PURPOSE = "quality-benchmarking"
ALL = "SELECT plant, defects FROM part_defects"


def test_max_rows_per_query_cuts_and_says_so(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    provider, grantee = provider_pair(policy_extra="limits: {max_rows_per_query: 30}\n")
    with connect(serve(provider), grantee) as peer:
        result = peer.fetch(ALL, PURPOSE)
        assert (result.table.num_rows, result.receipt.rows, result.receipt.truncated) == (
            30,
            30,
            True,
        )
        small = peer.fetch(ALL, PURPOSE, max_rows=5)
        assert small.table.num_rows == 5 and small.receipt.truncated


def test_daily_quotas_hold_across_a_restart(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    provider, grantee = provider_pair(
        policy_extra="limits: {queries_per_day: 3, rows_per_day: 250}\n"
    )
    server = serve(provider)
    with connect(server, grantee) as peer:
        first = peer.fetch(ALL, PURPOSE)
        assert (first.receipt.rows, first.receipt.truncated) == (200, False)
        second = peer.fetch(ALL, PURPOSE)
        assert (second.receipt.rows, second.receipt.truncated) == (50, True)
        with pytest.raises(ResourceExhausted, match=r"250 rows a day.*resets at"):
            peer.fetch(ALL, PURPOSE)
    server.stop(grace=1)
    restarted = start_server(load_settings(provider.home), "127.0.0.1:0")
    try:
        with connect(restarted, grantee) as peer, pytest.raises(ResourceExhausted):
            peer.fetch(ALL, PURPOSE)
    finally:
        restarted.stop(grace=1)


def test_queries_per_day(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    provider, grantee = provider_pair(policy_extra="limits: {queries_per_day: 2}\n")
    with connect(serve(provider), grantee) as peer:
        peer.fetch("SELECT count(*) FROM part_defects", PURPOSE)
        peer.fetch("SELECT count(*) FROM part_defects", PURPOSE)
        with pytest.raises(ResourceExhausted, match="2 queries a day"):
            peer.fetch("SELECT count(*) FROM part_defects", PURPOSE)


def test_catalog_shows_limits_and_obligations(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    provider, grantee = provider_pair(
        policy_extra="limits: {max_rows_per_query: 30, rows_per_day: 250}\n"
    )
    policy = provider.home / "policies" / "q.yaml"
    policy.write_text(policy.read_text() + "obligations: {delete_within_days: 30}\n")
    assert run_cli("policy", "sign", "--home", provider.home, policy) == 0
    with connect(serve(provider), grantee) as peer:
        (entry,) = peer.catalog()
    assert (entry.max_rows_per_query, entry.queries_per_day, entry.rows_per_day) == (30, 0, 250)
    assert (entry.max_bytes_per_query, entry.bytes_per_day) == (0, 0)
    assert entry.obligations["q"]["delete_within_days"] == 30


def test_memory_limit_ends_a_query_with_resource_exhausted_and_others_go_on(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    provider, grantee = provider_pair(settings={'memory_limit = "1GB"': 'memory_limit = "30MB"'})
    # A sort of 8 million rows: within the guard's size rule, past DuckDB's own limit.
    hungry = (
        "SELECT a.part_no || b.part_no || c.plant AS k "
        "FROM part_defects a, part_defects b, part_defects c ORDER BY k"
    )
    with connect(serve(provider), grantee) as peer:
        with pytest.raises(ResourceExhausted, match="more memory than this connector allows"):
            peer.fetch(hungry, PURPOSE)
        assert peer.fetch("SELECT count(*) FROM part_defects", PURPOSE).receipt.rows == 1


def _last_query_entry(provider: Member) -> dict[str, object]:
    settings = load_settings(provider.home)
    return [e for e in read_entries(settings.audit_log) if e.get("kind") == "query"][-1]


def test_max_bytes_per_query_cuts_at_a_row_and_counts_every_byte_sent(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    provider, grantee = provider_pair(policy_extra="limits: {max_bytes_per_query: 3000}\n")
    with connect(serve(provider), grantee) as peer:
        (entry,) = peer.catalog()
        assert entry.max_bytes_per_query == 3000
        result = peer.fetch(ALL, PURPOSE)
        small = peer.fetch("SELECT plant FROM part_defects LIMIT 3", PURPOSE)
    receipt = result.receipt
    assert len(result.arrow_ipc) == receipt.bytes <= 3000
    assert receipt.bytes > 2500  # cut at the last row that fits, not at a whole batch
    assert 0 < receipt.rows == result.table.num_rows < 200
    assert (receipt.truncated, receipt.limited_by) == (True, "max_bytes_per_query")
    assert (small.receipt.rows, small.receipt.truncated, small.receipt.limited_by) == (3, False, "")
    audit = _last_query_entry(provider)
    assert (audit["bytes"], audit["limited_by"]) == (small.receipt.bytes, "")


def test_bytes_per_day_is_claimed_before_sending_and_refuses_when_spent(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    provider, grantee = provider_pair(policy_extra="limits: {bytes_per_day: 2000}\n")
    server = serve(provider)
    with connect(server, grantee) as peer:
        first = peer.fetch(ALL, PURPOSE)
        assert (first.receipt.truncated, first.receipt.limited_by) == (True, "bytes_per_day")
        assert len(first.arrow_ipc) == first.receipt.bytes <= 2000
        audit = _last_query_entry(provider)
        assert (audit["bytes"], audit["limited_by"], audit["truncated"]) == (
            first.receipt.bytes,
            "bytes_per_day",
            True,
        )
        # What is left (less than a schema) is not enough to start another answer.
        with pytest.raises(ResourceExhausted, match=r"2000 bytes a day.*resets at"):
            peer.fetch(ALL, PURPOSE)
        assert _last_query_entry(provider)["outcome"] == "exhausted"
    used = QuotaLedger(load_settings(provider.home).quota_ledger)
    try:
        assert used.used("supplier-a", "q", dt.datetime.now(dt.UTC)).bytes <= 2000
    finally:
        used.close()


def test_the_catalog_names_byte_limits(
    provider_pair: ProviderPair,
    serve: Callable[[Member], RunningServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider, grantee = provider_pair(
        policy_extra="limits: {max_bytes_per_query: 100000, bytes_per_day: 9000000}\n",
    )
    server = serve(provider)
    with connect(server, grantee) as peer:
        (entry,) = peer.catalog()
    assert (entry.max_bytes_per_query, entry.bytes_per_day) == (100_000, 9_000_000)
    to = f"127.0.0.1:{server.port}"
    assert run_cli("catalog", "--home", grantee.home, "--to", to) == 0
    shown = capsys.readouterr().out
    assert "100000 bytes per query" in shown and "9000000 bytes a day" in shown
