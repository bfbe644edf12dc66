"""Refusals name the cause, never internals (issue 16.6), over mTLS against a real server.

An OPA server that stops answering must not show the peer the OPA address or the engine's
error text; the owner's log keeps the detail.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from connector.client import Peer
from connector.errors import Unavailable
from connector.server import RunningServer
from tests.conftest import Member, ProviderPair
from tests.opa_endpoint import opa_endpoint

PURPOSE = "quality-benchmarking"


def test_a_failing_policy_engine_shows_the_peer_no_internals(
    provider_pair: ProviderPair,
    serve: Callable[[Member], RunningServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    endpoint = opa_endpoint()
    url, _ = endpoint.__enter__()
    port = url.rsplit(":", 1)[1]
    provider, grantee = provider_pair(
        settings={'engine = "embedded"': f'engine = "opa"\nopa_url = "{url}"'}
    )
    server = serve(provider)
    sql = "SELECT plant, count(*) AS n FROM part_defects GROUP BY plant"
    with Peer(f"127.0.0.1:{server.port}", grantee.identity(), timeout=30) as peer:
        assert peer.query(sql, PURPOSE).num_rows == 4
        endpoint.__exit__(None, None, None)  # the OPA server is gone
        with pytest.raises(Unavailable) as refused:
            peer.query(sql, PURPOSE)
    text = str(refused.value)
    assert "policy engine is unavailable right now" in text
    assert str(port) not in text and "127.0.0.1" not in text and "Errno" not in text
    # The owner sees the cause.
    assert any(str(port) in r.getMessage() or "OPA" in r.getMessage() for r in caplog.records)
