"""`connector policy new` and `connector policy lint`, run as a legal team runs them."""

from __future__ import annotations

import datetime as dt
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Member, policy_text, run_cli, write_defects_csv


@pytest.fixture
def owner(tmp_path: Path, make_member: Callable[[str], Member]) -> Member:
    member = make_member("carmaker")
    member.ingest(write_defects_csv(tmp_path / "d.csv"), "part_defects")
    return member


def test_lint_catches_a_typo_a_past_until_and_an_unknown_key(
    owner: Member, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    draft = tmp_path / "draft.yaml"
    text = policy_text(
        "p",
        members="[supplier-a]",
        columns="[plant, defetcs, week]",
        valid_from="2024-01-01",
        valid_until="2025-01-01",
    )
    draft.write_text(text + "limitz: {queries_per_day: 5}\n")
    capsys.readouterr()
    assert run_cli("policy", "lint", "--home", owner.home, draft) == 1
    out = capsys.readouterr().out
    assert f"{draft}:9: error: column defetcs is not in dataset part_defects" in out
    assert "fix: did you mean defects?" in out
    assert f"{draft}:7: error: valid.until (2025-01-01T00:00:00+00:00) is already past" in out
    assert f"{draft}:10: error: unknown key 'limitz'" in out
    assert "fix: did you mean 'limits'?" in out
    assert "Traceback" not in out


def test_new_by_flags_lints_clean_and_is_signed_and_verified(
    owner: Member, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    draft = owner.home / "policies" / "supplier-quality.yaml"
    until = str(dt.date.today() + dt.timedelta(days=400))
    args: list[str | Path] = ["policy", "new", "--home", owner.home, "--id", "supplier-quality"]
    args += ["--dataset", "part_defects", "--member", "supplier-a", "--purpose", "quality"]
    args += ["--until", until, "--column", "plant", "--column", "Defects"]
    args += ["--mask", "supplier_price=hash", "--output", draft]
    assert run_cli(*args) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out
    assert draft.read_text().startswith("# Usage policy drafted")
    assert run_cli("policy", "lint", "--home", owner.home, "--strict", draft) == 0
    assert run_cli("policy", "sign", "--home", owner.home, draft) == 0
    capsys.readouterr()
    assert run_cli("policy", "verify", "--home", owner.home, draft) == 0
    out = capsys.readouterr().out
    assert ": valid: supplier-quality@1" in out
    assert "masked: supplier_price (hash)" in out
    # The same id written again is refused, not overwritten.
    assert run_cli(*args) == 1


def test_new_without_answers_off_a_terminal_says_which_flag(
    owner: Member, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.yaml"
    assert (
        run_cli("policy", "new", "--home", owner.home, "--dataset", "part_defects", "-o", out) == 1
    )
    assert "--until is missing" in capsys.readouterr().err
    assert not out.exists()


def test_new_refuses_a_dataset_the_home_lacks(
    owner: Member, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args: list[str | Path] = ["policy", "new", "--home", owner.home, "--dataset", "parts"]
    args += ["--until", "2030-01-01"]
    assert run_cli(*args, "-o", tmp_path / "p.yaml") == 1
    assert "choose from: part_defects" in capsys.readouterr().err


def test_warnings_fail_only_with_strict(
    owner: Member, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    draft = tmp_path / "draft.yaml"
    draft.write_text(policy_text("p", members="[supplier-a]", purposes="[Supplier Rating]"))
    assert run_cli("policy", "lint", "--home", owner.home, draft) == 0
    assert run_cli("policy", "lint", "--home", owner.home, "--strict", draft) == 1
    assert "warning: purpose 'Supplier Rating'" in capsys.readouterr().out


def test_lint_without_files_checks_the_home_folder_and_lower_versions(
    owner: Member, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    owner.write_policy("p.yaml", policy_text("p", members="[supplier-a]", version=3))
    assert run_cli("policy", "lint", "--home", owner.home) == 0
    draft = tmp_path / "draft.yaml"
    draft.write_text(policy_text("p", members="[supplier-a]", version=2))
    capsys.readouterr()
    assert run_cli("policy", "lint", "--home", owner.home, draft) == 1
    out = capsys.readouterr().out
    assert f"{draft}:2: error: version 2 of policy p is not above version 3 signed before" in out
    assert "fix: set `version: 4`" in out


@pytest.mark.slow
def test_new_on_a_terminal_shows_the_real_columns_and_asks_for_each_term(
    owner: Member, tmp_path: Path
) -> None:
    # A real pseudo-terminal, as a lawyer at a shell has: the command sees a tty and asks.
    draft = tmp_path / "asked.yaml"
    until = str(dt.date.today() + dt.timedelta(days=400))
    answers = [
        "part_defects",  # dataset(s)
        "",  # valid from: today
        until,  # valid until
        "supplier-quality",  # policy id
        "supplier-a",  # grantee(s)
        "quality",  # purpose(s)
        "plant, defects, week",  # columns in the clear
        "supplier_price=hash",  # masked
        "Defects for supplier A",  # description
    ]
    leader, follower = pty.openpty()
    command = [sys.executable, "-m", "connector.cli.main", "policy", "new"]
    command += ["--home", str(owner.home), "--output", str(draft)]
    process = subprocess.Popen(command, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    os.write(leader, "".join(a + "\n" for a in answers).encode())
    said = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closes with the process
            break
        if not chunk:
            break
        said += chunk
    assert process.wait(timeout=60) == 0, said.decode()
    os.close(leader)
    text = said.decode()
    assert "columns of part_defects:" in text
    assert "supplier_price  DOUBLE" in text  # the home's real column and its type
    assert "0 error(s), 0 warning(s)" in text
    written = draft.read_text()
    assert "id: supplier-quality" in written and "supplier_price: hash" in written
    assert run_cli("policy", "lint", "--home", owner.home, "--strict", draft) == 0
