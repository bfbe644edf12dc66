"""The `connector` command as users run it: outputs, formats, exit codes, messages."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import Space, policy_text, run_cli

PURPOSE = "quality-benchmarking"


def _peer_args(space: Space, command: str) -> list[str | Path]:
    return [command, "--home", space.grantee.home, "--to", f"127.0.0.1:{space.server.port}"]


def test_query_formats_and_output_file(
    tmp_path: Path, shared_space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    sql = "SELECT plant, count(*) AS n FROM part_defects GROUP BY plant ORDER BY plant"
    args = [*_peer_args(shared_space, "query"), "--purpose", PURPOSE, sql]
    assert run_cli(*args, "--format", "csv") == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == '"plant","n"'
    assert "4 rows from carmaker" in err and "quality-benchmark@1" in err
    assert run_cli(*args, "--format", "json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == {"plant": "Dingolfing", "n": 50}
    assert run_cli(*args, "--format", "parquet", "--output", tmp_path / "r.parquet") == 0
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 4
    assert run_cli(*args) == 0
    assert "Dingolfing" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("purpose", "sql", "message"),
    [
        ("marketing", "SELECT plant FROM part_defects", "purpose marketing is not allowed"),
        (PURPOSE, "SELECT supplier_price FROM part_defects", "column supplier_price"),
        (PURPOSE, "SELECT * FROM glob('/*')", "table functions such as glob()"),
        ("", "SELECT plant FROM part_defects", "purpose must be"),
    ],
)
def test_refusals_print_the_reason_and_exit_non_zero(
    shared_space: Space, capsys: pytest.CaptureFixture[str], purpose: str, sql: str, message: str
) -> None:
    assert run_cli(*_peer_args(shared_space, "query"), "--purpose", purpose, sql) == 1
    assert message in capsys.readouterr().err


def test_catalog_as_json(shared_space: Space, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(*_peer_args(shared_space, "catalog"), "--format", "json") == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["dataset"] == "part_defects"
    assert entry["policies"] == ["quality-benchmark@1"]


def test_explain_shows_decision_and_view(
    shared_space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    sql = "SELECT * FROM part_defects"
    assert run_cli(*_peer_args(shared_space, "explain"), "--purpose", PURPOSE, sql) == 0
    out = capsys.readouterr().out
    assert out.startswith("allowed")
    assert "runs on: SELECT plant, part_no, defect_code, defects, week FROM part_defects" in out
    assert run_cli(*_peer_args(shared_space, "explain"), "--purpose", "marketing", sql) == 1
    assert "denied" in capsys.readouterr().out


def test_policy_verify_says_for_each_file_why(
    space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    provider = space.provider
    provider.write_policy("unsigned.yaml", policy_text("u", members="[x]"), sign=False)
    provider.write_policy(
        "expired.yaml",
        policy_text("e", members="[x]", valid_from="2020-01-01", valid_until="2021-01-01"),
    )
    provider.write_policy(
        "shaped.yaml",
        policy_text("s", members="[x]")
        + "  mask: {supplier_price: hash}\n"
        + "rows: {where: {plant: [Leipzig]}}\naggregate_only: {min_group_size: 5}\n",
    )
    changed = provider.write_policy("changed.yaml", policy_text("c", members="[x]"))
    changed.write_text(changed.read_text().replace("[x]", "[x, y]"))
    assert run_cli("policy", "verify", "--home", provider.home) == 1
    out = capsys.readouterr().out
    lines = {Path(line.split(":")[0]).name: line for line in out.splitlines()}
    assert "valid: quality-benchmark@1" in lines["quality.yaml"]
    assert "NOT VALID: no signature" in lines["unsigned.yaml"]
    assert "NOT VALID: e@1 expired" in lines["expired.yaml"]
    assert "changed after it was signed" in lines["changed.yaml"]
    assert "valid: s@1" in lines["shaped.yaml"]
    shaped = out.split(lines["shaped.yaml"])[1].splitlines()[1:4]
    assert shaped == [
        "  masked: supplier_price (hash)",
        "  rows: only where (\"plant\" IN ('Leipzig'))",
        "  aggregate-only: groups of at least 5 rows, no raw rows",
    ]


def test_unreachable_provider_is_a_clear_error(
    shared_space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    args: list[str | Path] = ["catalog", "--home", shared_space.grantee.home, "--to", "127.0.0.1:1"]
    args += ["--timeout", "3"]
    assert run_cli(*args) == 1
    assert "unreachable" in capsys.readouterr().err


def test_commands_without_a_home_say_how_to_make_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("serve", "--home", tmp_path) == 1
    assert "connector init" in capsys.readouterr().err


def test_datasets_lists_the_members_data(
    shared_space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("datasets", "--home", shared_space.grantee.home) == 0
    assert capsys.readouterr().out == ""
    # The provider's file is held by its running server; listing is read-only and works.
    assert run_cli("datasets", "--home", shared_space.provider.home) == 0
    assert "part_defects  200 rows  6 columns  Weekly defects" in capsys.readouterr().out
