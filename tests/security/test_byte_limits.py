"""Byte limits over mutual TLS: what leaves is counted in bytes, whatever its shape, exactly
under concurrency."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable

from connector.config import load_settings
from connector.errors import ResourceExhausted
from connector.quota import QuotaLedger
from connector.server import RunningServer
from tests.conftest import Member, ProviderPair, connect

PURPOSE = "quality-benchmarking"


def test_a_packed_row_larger_than_the_byte_limit_does_not_leave(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    provider, grantee = provider_pair(policy_extra="limits: {max_bytes_per_query: 1500}\n")
    with connect(serve(provider), grantee) as peer:
        packed = peer.fetch(
            "SELECT string_agg(part_no || plant, ',') AS s FROM part_defects", PURPOSE
        )
        rows = peer.fetch("SELECT plant, part_no, week FROM part_defects", PURPOSE)
    assert (packed.receipt.rows, packed.receipt.truncated) == (0, True)
    assert packed.receipt.limited_by == "max_bytes_per_query"
    assert len(packed.arrow_ipc) == packed.receipt.bytes <= 1500
    assert packed.table.num_rows == 0  # still a valid Arrow stream: schema, no rows
    assert 0 < rows.receipt.rows < 200 and len(rows.arrow_ipc) <= 1500


def test_concurrent_peers_never_take_more_bytes_a_day_than_the_policy_allows(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    limit = 20_000
    provider, grantee = provider_pair(policy_extra=f"limits: {{bytes_per_day: {limit}}}\n")
    server = serve(provider)
    received: list[int] = []
    refused: list[str] = []
    lock = threading.Lock()

    def peer_loop() -> None:
        with connect(server, grantee) as peer:
            for _ in range(6):
                try:
                    result = peer.fetch("SELECT plant, part_no, week FROM part_defects", PURPOSE)
                except ResourceExhausted as exc:
                    with lock:
                        refused.append(str(exc))
                    continue
                assert len(result.arrow_ipc) == result.receipt.bytes
                with lock:
                    received.append(result.receipt.bytes)

    threads = [threading.Thread(target=peer_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ledger = QuotaLedger(load_settings(provider.home).quota_ledger)
    try:
        claimed = ledger.used("supplier-a", "q", dt.datetime.now(dt.UTC)).bytes
    finally:
        ledger.close()
    assert sum(received) == claimed <= limit  # every byte sent was claimed, and only those
    assert sum(received) > limit - 2_000  # the day's bytes were used, not wasted
    assert refused and all("bytes a day" in r and "resets at" in r for r in refused)
