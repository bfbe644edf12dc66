"""CSV ingest is strict: ragged rows and unclosed quotes are refused with the line, nothing
is half-loaded, and the dialect is detected or given with --csv-option."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from connector.errors import DataError
from connector.store import create_database, list_datasets
from connector.store_ingest import LoadRequest, ingest, stage
from tests.conftest import run_cli


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "data.duckdb"
    create_database(path)
    return path


def _write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b,c\n1,2,3\n4,5\n6,7,8,9\n", "line 3: 2 fields, but the header has 3"),
        ("a,b,c\n1,2,3\n6,7,8,9\n", "line 3: 4 fields, but the header has 3"),
        ('a,b,c\n1,2,3\n"x,2,3\n', "line 3"),
        ('a,b,c\n1,"2,3\n4,5,6\n', "never closed"),
        ("", "is empty"),
        ("a;b;c\n1;2;3\n4;5\n", "line 3: 2 fields"),
    ],
    ids=[
        "short row",
        "long row",
        "unclosed quote at the end",
        "unclosed quote inside",
        "empty",
        "ragged with semicolons",
    ],
)
def test_malformed_csv_is_refused_with_the_line_and_nothing_is_loaded(
    tmp_path: Path, database: Path, text: str, message: str
) -> None:
    ingest(
        database,
        _write(tmp_path, "good.csv", "a,b,c\n1,2,3\n"),
        "d",
        description="",
        mode="replace",
    )
    with pytest.raises(DataError, match=message):
        ingest(database, _write(tmp_path, "bad.csv", text), "d", description="", mode="replace")
    (info,) = list_datasets(database)
    assert info.rows == 1  # the earlier load stands


def test_the_dialect_is_detected_or_given(tmp_path: Path, database: Path) -> None:
    semicolons = _write(tmp_path, "s.csv", "plant;defects\nLeipzig;3\n")
    info = ingest(database, semicolons, "s", description="", mode="replace")
    assert [c.name for c in info.columns] == ["plant", "defects"]
    tabs = _write(tmp_path, "t.csv", "a\tb\n1\t2\n")
    info = ingest(database, tabs, "t", description="", mode="replace",
                  csv_options={"delimiter": "tab"})  # fmt: skip
    assert [c.name for c in info.columns] == ["a", "b"]
    latin = _write(tmp_path, "l.csv", "plant,name\nLeipzig,Müller\n", encoding="latin-1")
    with pytest.raises(DataError, match="not utf-8 text; pass --csv-option encoding"):
        ingest(database, latin, "l", description="", mode="replace")
    info = ingest(database, latin, "l", description="", mode="replace",
                  csv_options={"encoding": "latin-1"})  # fmt: skip
    assert info.rows == 1
    with pytest.raises(DataError, match="unknown --csv-option sep"):
        ingest(database, tabs, "t", description="", mode="replace", csv_options={"sep": ","})
    quoted = _write(tmp_path, "q.csv", 'a,b\n"x, y",2\n"say ""hi""",3\n')
    assert ingest(database, quoted, "q", description="", mode="replace").rows == 2


def test_the_cli_reports_the_line_and_exits_1(
    tmp_path: Path, dataspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "m"
    assert run_cli("init", home, "--member", "m", "--dataspace", dataspace) == 0
    bad = _write(tmp_path, "bad.csv", "a,b,c\n1,2,3\n4,5\n")
    assert run_cli("ingest", "--home", home, bad, "--dataset", "bad") == 1
    assert "bad.csv, line 3: 2 fields, but the header has 3" in capsys.readouterr().err
    semi = _write(tmp_path, "semi.csv", "a;b\n1;2\n")
    assert run_cli("ingest", "--home", home, semi, "--dataset", "semi",
                   "--csv-option", "delimiter=;") == 0  # fmt: skip
    assert run_cli("ingest", "--home", home, semi, "--dataset", "semi",
                   "--csv-option", "delimiter") == 1  # fmt: skip


def test_files_staged_at_once_each_read_their_own_rows_and_leave_nothing(tmp_path: Path) -> None:
    # Staged files share one in-memory reading database (opening one per file cost half of a
    # small ingest): each must still read only its own file, also from two threads at once.
    paths = []
    for n in range(4):
        path = tmp_path / f"f{n}.csv"
        path.write_text("k,v\n" + "".join(f"{n},{i}\n" for i in range(5000)), encoding="utf-8")
        paths.append(path)
    results: dict[int, list[int]] = {}

    def read(n: int) -> None:
        with stage(LoadRequest(paths[n], f"d{n}", "replace")) as staged:
            table = staged.reader().read_all()
        results[n] = sorted(set(table.column("k").to_pylist()))

    threads = [threading.Thread(target=read, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == {n: [n] for n in range(4)}
    with stage(LoadRequest(paths[0], "d0", "replace")) as staged:
        staged.reader().read_all()
        leftovers = staged._con.execute(
            "SELECT count(*) FROM duckdb_tables() WHERE NOT internal"
        ).fetchone()
    assert leftovers == (0,)
