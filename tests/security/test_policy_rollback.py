"""An old, validly signed policy version copied back over its successor stays refused, over
mTLS and after a restart; `policy verify` says it was rolled back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connector.errors import PermissionDenied
from connector.policy.signing import signature_path
from connector.server import RunningServer
from tests.conftest import Member, connect, policy_text, run_cli, write_defects_csv

PURPOSE = "quality-benchmarking"
V1_COLUMNS = "[plant, part_no, defect_code, defects, week]"
V2_COLUMNS = "[plant, defect_code, defects, week]"  # part_no withdrawn


def _answers(server: RunningServer, grantee: Member, sql: str) -> set[str] | None:
    """The distinct first column of the answer, or None when the query was refused."""
    with connect(server, grantee) as peer:
        try:
            table = peer.query(sql, PURPOSE)
        except PermissionDenied:
            return None
    return {str(v) for v in table.column(0).to_pylist()}


@pytest.mark.slow
def test_a_copied_back_old_version_brings_nothing_back_also_after_a_restart(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider, grantee = make_member("carmaker"), make_member("supplier-a")
    provider.ingest(write_defects_csv(tmp_path / "d.csv"), "part_defects")
    path = provider.write_policy(
        "q.yaml", policy_text("q", members="[supplier-a]", columns=V1_COLUMNS)
    )
    old_policy, old_signature = path.read_bytes(), signature_path(path).read_bytes()
    server = serve(provider)
    assert _answers(server, grantee, "SELECT DISTINCT part_no FROM part_defects")
    assert len(_answers(server, grantee, "SELECT DISTINCT plant FROM part_defects") or ()) == 4

    provider.write_policy(
        "q.yaml",
        policy_text("q", members="[supplier-a]", columns=V2_COLUMNS, version=2)
        + "rows: {where: {plant: [Leipzig]}}\n",
    )
    server.reload()
    assert _answers(server, grantee, "SELECT DISTINCT part_no FROM part_defects") is None
    assert _answers(server, grantee, "SELECT DISTINCT plant FROM part_defects") == {"Leipzig"}

    path.write_bytes(old_policy)  # the attack: version 1 and its valid signature put back
    signature_path(path).write_bytes(old_signature)
    server.reload()
    for attempt in ("now", "after a restart"):
        assert _answers(server, grantee, "SELECT DISTINCT part_no FROM part_defects") is None, (
            attempt
        )
        plants = _answers(server, grantee, "SELECT DISTINCT plant FROM part_defects")
        assert plants in (None, {"Leipzig"}), attempt
        with connect(server, grantee) as peer:
            assert peer.catalog() == [], attempt
        server.stop(grace=1)
        server = serve(provider)

    capsys.readouterr()
    assert run_cli("policy", "verify", "--home", provider.home) == 1
    assert "rolled back: version 1 is older than version 2 already in force" in (
        capsys.readouterr().out
    )
