"""The catalog says exactly what a peer gets under each purpose: one entry per set of
purposes with the same terms, never a merged shape that no query sees."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connector.errors import PermissionDenied
from connector.server import RunningServer
from tests.conftest import Member, connect, policy_text, run_cli, write_defects_csv

BENCH, RATING, AUDIT = "quality-benchmarking", "supplier-rating", "audit"


@pytest.fixture
def offered(
    tmp_path: Path, make_member: Callable[[str], Member], serve: Callable[[Member], RunningServer]
) -> tuple[RunningServer, Member]:
    provider, grantee = make_member("carmaker"), make_member("supplier-a")
    provider.ingest(write_defects_csv(tmp_path / "d.csv"), "part_defects")
    provider.write_policy(
        "plain.yaml",
        policy_text("plain", members="[supplier-a]", purposes=f"[{BENCH}, {AUDIT}]"),
    )
    provider.write_policy(
        "shaped.yaml",
        policy_text(
            "shaped", members="[supplier-a]", purposes=f"[{RATING}]", columns="[plant, defects]"
        )
        + "  mask: {part_no: hash}\n"
        + "rows: {where: {plant: [Leipzig, Munich]}}\n"
        + "aggregate_only: {min_group_size: 5}\n"
        + "limits: {queries_per_day: 7}\n",
    )
    return serve(provider), grantee


def test_each_purpose_group_has_its_own_entry_with_its_own_terms(
    offered: tuple[RunningServer, Member],
) -> None:
    server, grantee = offered
    with connect(server, grantee) as peer:
        entries = {tuple(e.purposes): e for e in peer.catalog()}
        assert set(entries) == {(AUDIT, BENCH), (RATING,)}
        plain, shaped = entries[(AUDIT, BENCH)], entries[(RATING,)]
        assert plain.masks == {} and plain.row_filter == "" and plain.min_group_size == 0
        assert [str(p) for p in plain.policies] == ["plain@1"]
        assert plain.queries_per_day == 0
        assert "supplier_price" not in dict(plain.columns)
        assert shaped.masks == {"part_no": "hash"}
        assert "Leipzig" in shaped.row_filter and shaped.min_group_size == 5
        assert [str(p) for p in shaped.policies] == ["shaped@1"]
        assert shaped.queries_per_day == 7
        assert set(dict(shaped.columns)) == {"plant", "part_no", "defects"}
        # What the plain entry promises is what a query under its purpose gets.
        rows = peer.query("SELECT DISTINCT part_no FROM part_defects", BENCH)
        assert all(v.startswith("P-") for v in rows.column("part_no").to_pylist())


def test_a_purpose_whose_policies_conflict_is_not_listed(
    offered: tuple[RunningServer, Member], tmp_path: Path
) -> None:
    server, grantee = offered
    provider_home = Path(server.settings.home)
    (provider_home / "policies" / "clash.yaml").write_text(
        policy_text("clash", members="[supplier-a]", purposes=f"[{RATING}]", columns="[plant]")
    )
    assert run_cli("policy", "sign", "--home", provider_home,
                   provider_home / "policies" / "clash.yaml") == 0  # fmt: skip
    server.reload()
    with connect(server, grantee) as peer:
        assert {tuple(e.purposes) for e in peer.catalog()} == {(AUDIT, BENCH)}
        with pytest.raises(PermissionDenied, match="shape"):
            peer.query("SELECT plant FROM part_defects", RATING)
