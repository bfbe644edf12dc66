"""Any column name ingest accepts can be granted, masked and filtered: headers that are not
plain SQL names are refused with the names they would get, or loaded under them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connector.column_names import plain_name
from connector.server import RunningServer
from tests.conftest import Member, connect, policy_text, run_cli

HEADERS = "plant name,défauts (n°),Größe,2nd shift"
ROWS = ["Leipzig,3,10,a", "Leipzig,5,11,b", "Munich,7,12,c"]


@pytest.mark.parametrize(
    ("header", "name"),
    [("plant name", "plant_name"), ("défauts (n°)", "defauts_n"), ("Größe", "grosse"),
     ("2nd shift", "c_2nd_shift"), ("   ", "column"), ("Ωmega", "mega")],
)  # fmt: skip
def test_plain_names(header: str, name: str) -> None:
    assert plain_name(header) == name


def test_such_headers_are_refused_with_their_plain_names_then_loaded_and_shared(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider, grantee = make_member("carmaker"), make_member("supplier-a")
    source = tmp_path / "odd.csv"
    source.write_text("\n".join([HEADERS, *ROWS]) + "\n", encoding="utf-8")
    args = ("ingest", "--home", provider.home, source, "--dataset", "odd")
    assert run_cli(*args) == 1
    err = capsys.readouterr().err
    assert "'plant name' -> plant_name" in err and "'Größe' -> grosse" in err
    assert "--normalise-names" in err
    assert run_cli(*args, "--normalise-names") == 0
    assert "plant_name VARCHAR, defauts_n BIGINT, grosse BIGINT, c_2nd_shift VARCHAR" in (
        capsys.readouterr().out
    )
    provider.write_policy(
        "p.yaml",
        policy_text("p", members="[supplier-a]", datasets="[odd]", columns="[plant_name, grosse]")
        + "  mask: {c_2nd_shift: redact}\n"
        + "rows: {where: {plant_name: [Leipzig]}}\n",
    )
    server = serve(provider)
    with connect(server, grantee) as peer:
        table = peer.query(
            "SELECT plant_name, grosse, c_2nd_shift FROM odd ORDER BY grosse",
            "quality-benchmarking",
        )
    assert table.to_pylist() == [
        {"plant_name": "Leipzig", "grosse": 10, "c_2nd_shift": "REDACTED"},
        {"plant_name": "Leipzig", "grosse": 11, "c_2nd_shift": "REDACTED"},
    ]


def test_two_headers_with_one_plain_name_are_refused(
    tmp_path: Path, make_member: Callable[[str], Member], capsys: pytest.CaptureFixture[str]
) -> None:
    provider = make_member("carmaker")
    source = tmp_path / "twice.csv"
    source.write_text("plant name,plant-name\nA,B\n", encoding="utf-8")
    capsys.readouterr()
    assert run_cli("ingest", "--home", provider.home, source, "--dataset", "t",
                   "--normalise-names") == 1  # fmt: skip
    assert "would both be named plant_name" in capsys.readouterr().err


def test_a_rowid_column_is_refused_or_renamed_and_incremental_reads_stay_exact(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A column named rowid would hide DuckDB's row number from the rows-since-version SQL.
    provider, grantee = make_member("carmaker"), make_member("supplier-a")
    first, more = tmp_path / "first.csv", tmp_path / "more.csv"
    first.write_text("ROWID,plant\n900,Leipzig\n901,Munich\n", encoding="utf-8")
    more.write_text("rowid,plant\n0,Dresden\n", encoding="utf-8")
    args = ("ingest", "--home", provider.home, first, "--dataset", "lots")
    capsys.readouterr()
    assert run_cli(*args) == 1
    assert "may not be named 'ROWID'" in capsys.readouterr().err
    assert run_cli(*args, "--normalise-names") == 0
    assert run_cli("ingest", "--home", provider.home, more, "--dataset", "lots", "--append",
                   "--normalise-names") == 0  # fmt: skip
    provider.write_policy(
        "p.yaml",
        policy_text("p", members="[supplier-a]", datasets="[lots]", columns="[rowid_, plant]"),
    )
    with connect(serve(provider), grantee) as peer:
        since = peer.query("SELECT * FROM lots", "quality-benchmarking", since_version=1)
    assert since.to_pylist() == [{"rowid_": 0, "plant": "Dresden"}]
