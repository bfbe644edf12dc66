"""An OPA server shared by several connectors, or one that lies, never widens a grant.

Run over mTLS against real servers whose engine is `opa`, pointed at a small
OPA-compatible endpoint (tests/opa_endpoint.py): no OPA binary can be installed here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connector.errors import PermissionDenied, Unavailable
from connector.server import RunningServer
from tests.conftest import Member, connect, policy_text, wait_for, write_defects_csv
from tests.opa_endpoint import OpaState, opa_endpoint

PURPOSE = "quality-benchmarking"


def _use_opa(member: Member, url: str, extra: str = "") -> None:
    config = member.home / "connector.toml"
    text = config.read_text()
    assert 'engine = "embedded"' in text
    config.write_text(
        text.replace('engine = "embedded"', f'engine = "opa"\nopa_url = "{url}"{extra}')
    )


def _provider(
    make_member: Callable[[str], Member], tmp_path: Path, name: str, columns: str
) -> Member:
    provider = make_member(name)
    provider.ingest(write_defects_csv(tmp_path / f"{name}.csv"), "part_defects")
    provider.write_policy("q.yaml", policy_text("q", members="[supplier-a]", columns=columns))
    return provider


def test_two_connectors_on_one_opa_each_answer_by_their_own_policies(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
) -> None:
    grantee = make_member("supplier-a")
    # Same policy id, same member, same dataset: only the columns differ. Before each
    # connector wrote under its own OPA names, the second push replaced the first's.
    narrow = _provider(make_member, tmp_path, "carmaker-a", "[plant]")
    wide = _provider(make_member, tmp_path, "carmaker-b", "[plant, defects]")
    with opa_endpoint() as (url, state):
        _use_opa(narrow, url)
        _use_opa(wide, url)
        narrow_server, wide_server = serve(narrow), serve(wide)
        with connect(narrow_server, grantee) as peer:
            with pytest.raises(PermissionDenied, match="column defects"):
                peer.query("SELECT plant, defects FROM part_defects", PURPOSE)
            assert peer.query("SELECT plant FROM part_defects LIMIT 1", PURPOSE).num_rows == 1
        with connect(wide_server, grantee) as peer:
            assert peer.query("SELECT defects FROM part_defects LIMIT 1", PURPOSE).num_rows == 1
        assert len(state.modules) == 2


def test_an_opa_that_allows_everything_is_not_obeyed(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    grantee, outsider = make_member("supplier-a"), make_member("supplier-b")
    provider = _provider(make_member, tmp_path, "carmaker", "[plant]")
    with opa_endpoint() as (url, state):
        _use_opa(provider, url)
        server = serve(provider)
        state.allow_everything = True  # from now on OPA answers "allow" to anything
        for member, sql in (
            (grantee, "SELECT plant, supplier_price FROM part_defects"),
            (outsider, "SELECT plant FROM part_defects"),
            (grantee, "SELECT plant FROM part_defects"),  # untrusted until the next push
        ):
            with connect(server, member) as peer, pytest.raises(PermissionDenied) as refused:
                peer.query(sql, PURPOSE)
            assert "127.0.0.1" not in str(refused.value)
        assert "answered beyond the signed policies" in caplog.text
        state.allow_everything = False
        server.reload()  # a new push: trusted again, and answers as the policy says
        with connect(server, grantee) as peer:
            assert peer.query("SELECT plant FROM part_defects LIMIT 2", PURPOSE).num_rows == 2


def test_opa_with_a_bearer_token_and_https(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
    dataspace: Path,
) -> None:
    grantee = make_member("supplier-a")
    provider = _provider(make_member, tmp_path, "carmaker", "[plant]")
    # The OPA server presents a certificate of the data-space CA (any CA file works).
    tls = (str(grantee.home / "tls" / "cert.pem"), str(grantee.home / "tls" / "key.pem"))
    (provider.home / "keys" / "opa.token").write_text("s3cret-token\n")
    ca = provider.home / "tls" / "ca.pem"
    with opa_endpoint(OpaState(token="s3cret-token"), tls=tls) as (url, state):
        _use_opa(provider, url, f'\nopa_token_file = "keys/opa.token"\nopa_ca = "{ca}"')
        server = serve(provider)
        with connect(server, grantee) as peer:
            assert peer.query("SELECT plant FROM part_defects LIMIT 1", PURPOSE).num_rows == 1
            # The answer came from this OPA: once it no longer takes the token, the
            # connector gets no decision and refuses for now (fails closed).
            state.token = "another-token"
            with pytest.raises(Unavailable):
                peer.query("SELECT plant FROM part_defects LIMIT 1", PURPOSE)


def test_an_opa_whose_policies_were_overwritten_is_not_obeyed(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    grantee = make_member("supplier-a")
    provider = _provider(make_member, tmp_path, "carmaker", "[plant]")
    with opa_endpoint() as (url, state):
        _use_opa(provider, url)
        server = serve(provider)
        # Another writer replaces this connector's policies in OPA with wider ones.
        (namespace,) = state.data["connector_data"]
        stored = state.data["connector_data"][namespace]["usage_policies"]
        stored["items"][0]["columns"] = ["plant", "supplier_price"]
        stored["revision"] = "someone-else"
        with connect(server, grantee) as peer, pytest.raises(Unavailable):
            peer.query("SELECT plant, supplier_price FROM part_defects", PURPOSE)
        assert "someone-else" in caplog.text
        # The connector pushes its own policies again and answers by them.
        wait_for(lambda: stored is not state.data["connector_data"][namespace]["usage_policies"])
        # ... and answers once it has seen OPA answer from them (the probe after the push).
        assert server.opa is not None
        wait_for(lambda: server.opa is not None and server.opa.available)
        with connect(server, grantee) as peer:
            with pytest.raises(PermissionDenied, match="column supplier_price"):
                peer.query("SELECT plant, supplier_price FROM part_defects", PURPOSE)
            assert peer.query("SELECT plant FROM part_defects LIMIT 1", PURPOSE).num_rows == 1
