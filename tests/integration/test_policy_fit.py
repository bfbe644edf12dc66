"""`policy verify` and the server log say why a valid policy can never work."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connector.server import RunningServer
from tests.conftest import Member, policy_text, run_cli, write_defects_csv

MISFITS = [
    ("datasets: [part_defect]", "dataset part_defect does not exist in this home's data "
     "(did you mean part_defects?)"),
    ("columns: [plant, defect]", "column defect is not in dataset part_defects "
     "(did you mean defects?)"),
    ("rows: {where: {plants: [Leipzig]}}", "the row filter names column plants, which "
     "dataset part_defects does not have (did you mean plant?)"),
    ("rows: {where: {week: {gte: March}}}", "the row filter on part_defects.week (DATE) "
     "holds 'March'"),
    ("purposes: [Supplier Rating]", "purpose 'Supplier Rating' has capitals or spaces"),
]  # fmt: skip


def _policy(change: str) -> str:
    if change.startswith("datasets:"):
        return policy_text("p", members="[supplier-a]", datasets=change.split(": ", 1)[1])
    if change.startswith("columns:"):
        return policy_text("p", members="[supplier-a]", columns=change.split(": ", 1)[1])
    if change.startswith("purposes:"):
        return policy_text("p", members="[supplier-a]", purposes=change.split(": ", 1)[1])
    return policy_text("p", members="[supplier-a]") + change + "\n"


@pytest.mark.parametrize(("change", "warning"), MISFITS, ids=[m[0] for m in MISFITS])
def test_policy_verify_warns_about_policies_that_can_never_work(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    change: str,
    warning: str,
) -> None:
    provider = make_member("carmaker")
    provider.ingest(write_defects_csv(tmp_path / "d.csv"), "part_defects")
    provider.write_policy("p.yaml", _policy(change))
    capsys.readouterr()
    run_cli("policy", "verify", "--home", provider.home)
    assert warning in capsys.readouterr().out
    serve(provider)
    assert warning in caplog.text  # the server log says why the grant answers nothing


def test_a_policy_that_fits_has_no_warning(
    tmp_path: Path, make_member: Callable[[str], Member], capsys: pytest.CaptureFixture[str]
) -> None:
    provider = make_member("carmaker")
    provider.ingest(write_defects_csv(tmp_path / "d.csv"), "part_defects")
    provider.write_policy(
        "p.yaml",
        policy_text("p", members="[supplier-a]") + "rows: {where: {week: {gte: 2026-03-01}}}\n",
    )
    capsys.readouterr()
    assert run_cli("policy", "verify", "--home", provider.home) == 0
    assert "WARNING" not in capsys.readouterr().out
