"""A hash mask cannot be decoded through a clear grant of the same column under another
purpose: the owner is warned, and with mask_consistency = "refuse" such queries are refused."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connector.errors import PermissionDenied
from connector.policy.consistency import mask_conflicts
from connector.policy.model import parse_policy
from connector.server import RunningServer
from tests.conftest import Member, connect, policy_text, run_cli, write_defects_csv

BENCH, AUDIT = "bench", "audit"


def _provider(make_member: Callable[[str], Member], tmp_path: Path, mode: str = "warn") -> Member:
    provider = make_member("carmaker")
    config = provider.home / "connector.toml"
    config.write_text(
        config.read_text().replace('mask_consistency = "warn"', f'mask_consistency = "{mode}"')
    )
    provider.ingest(write_defects_csv(tmp_path / "d.csv"), "part_defects")
    return provider


def _two_grants(provider: Member) -> None:
    # bench: every plant, part_no hashed. audit: part_no in the clear, one plant only.
    provider.write_policy(
        "bench.yaml",
        policy_text("bench", members="[supplier-a]", purposes=f"[{BENCH}]", columns="[plant]")
        + "  mask: {part_no: hash}\n",
    )
    provider.write_policy(
        "audit.yaml",
        policy_text(
            "audit", members="[supplier-a]", purposes=f"[{AUDIT}]", columns="[plant, part_no]"
        )
        + "rows: {where: {plant: [Leipzig]}}\n",
    )


def test_the_owner_is_warned_and_the_dictionary_attack_works_only_in_warn_mode(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider, grantee = _provider(make_member, tmp_path), make_member("supplier-a")
    _two_grants(provider)
    server = serve(provider)
    assert "masked for member supplier-a by bench@1 but in the clear by audit@1" in caplog.text
    with connect(server, grantee) as peer:
        hashed = peer.query("SELECT DISTINCT plant, part_no FROM part_defects", BENCH)
        clear = peer.query("SELECT DISTINCT plant, part_no FROM part_defects", AUDIT)
    assert hashed.num_rows > clear.num_rows > 0  # warn mode: both answer (the risk)


def test_refuse_mode_refuses_queries_on_the_dataset_under_either_purpose(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
) -> None:
    provider = _provider(make_member, tmp_path, "refuse")
    grantee, other = make_member("supplier-a"), make_member("supplier-b")
    provider.write_policy(
        "other.yaml", policy_text("other", members="[supplier-b]", columns="[plant, part_no]")
    )
    _two_grants(provider)
    server = serve(provider)
    with connect(server, grantee) as peer:
        for purpose in (BENCH, AUDIT):
            with pytest.raises(PermissionDenied) as refused:
                peer.query("SELECT plant, part_no FROM part_defects", purpose)
            assert refused.value.reasons == [
                "column part_no of dataset part_defects is masked for you by policy bench@1 "
                "but in the clear by policy audit@1; the owner must make them consistent before "
                "this dataset is answered"
            ]
    with connect(server, other) as peer:  # another member's grants are not concerned
        assert peer.query("SELECT part_no FROM part_defects LIMIT 1", "quality-benchmarking")


def test_conflicts_name_both_policies_and_only_shared_members_and_datasets(
    tmp_path: Path,
) -> None:
    def policy(name: str, text: str) -> object:
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        return parse_policy(path)

    masked = policy(
        "m",
        policy_text("m", members="[a, b]", datasets="[d1, d2]", columns="[x]")
        + "  mask: {k: hash}\n",
    )
    clear = policy("c", policy_text("c", members="[b, c]", datasets="[d2, d3]", columns="[k]"))
    unrelated = policy("u", policy_text("u", members="[a]", datasets="[d1]", columns="[w]"))
    conflicts = mask_conflicts([masked, clear, unrelated])  # type: ignore[list-item]
    assert [
        (c.member, c.dataset, c.column, str(c.masked_by), str(c.clear_by)) for c in conflicts
    ] == [("b", "d2", "k", "m@1", "c@1")]


def test_policy_verify_warns_about_the_pair(
    tmp_path: Path, make_member: Callable[[str], Member], capsys: pytest.CaptureFixture[str]
) -> None:
    provider = _provider(make_member, tmp_path)
    _two_grants(provider)
    capsys.readouterr()
    assert run_cli("policy", "verify", "--home", provider.home) == 0
    out = capsys.readouterr().out
    assert "WARNING: column part_no of dataset part_defects is masked for member supplier-a" in out
    assert "by bench@1 but in the clear by audit@1" in out
