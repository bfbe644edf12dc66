"""`connector policy explain` and `policy diff` on real files, as a legal team runs them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Member, policy_text, run_cli, write_defects_csv

COLUMNS = "[plant, part_no, defect_code, defects, week]"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def draft(path: Path, columns: str = COLUMNS, **terms: str) -> Path:
    text = policy_text(
        "supplier-quality", members="[voltcell]", valid_until="2030-01-01", columns=columns
    )
    return write(path, text + "".join(f"{k}: {v}\n" for k, v in terms.items()))


@pytest.fixture
def home(make_member: Callable[[str], Member], tmp_path: Path) -> Member:
    member = make_member("carmaker")
    member.ingest(write_defects_csv(tmp_path / "defects.csv"), "part_defects")
    return member


def test_explain_names_who_what_purpose_and_until_when(
    home: Member, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = draft(tmp_path / "draft.yaml", obligations="{delete_within_days: 30}")
    assert run_cli("policy", "explain", "--home", home.home, path) == 0
    out = capsys.readouterr().out
    assert "Who: only member(s) voltcell" in out
    assert "Datasets: part_defects" in out
    assert "Columns in the clear: plant, part_no, defect_code, defects, week" in out
    assert "Purposes: only for quality-benchmarking" in out
    assert "until 2030-01-01 00:00 UTC" in out
    assert "delete received data within 30 days" in out
    # From the home: what the contract does not cover, and that this draft is not signed.
    assert "Columns of part_defects not shared: supplier_price" in out
    assert "Signature and dates: unsigned" in out


def test_explain_as_json_for_tools(
    home: Member, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = draft(tmp_path / "draft.yaml", aggregate_only="{min_group_size: 5}")
    assert run_cli("policy", "explain", "--home", home.home, path, "--format", "json") == 0
    explained = json.loads(capsys.readouterr().out)
    assert explained["members"] == ["voltcell"]
    assert explained["purposes"] == ["quality-benchmarking"]
    assert explained["valid_until"] == "2030-01-01T00:00:00+00:00"
    assert explained["min_group_size"] == 5
    assert explained["columns_withheld"] == {"part_defects": ["supplier_price"]}
    assert explained["status"].startswith("unsigned")


def test_explain_of_a_signed_policy_in_the_home(
    home: Member, capsys: pytest.CaptureFixture[str]
) -> None:
    path = home.write_policy("q.yaml", policy_text("q", members="[voltcell]"))
    capsys.readouterr()
    assert run_cli("policy", "explain", "--home", home.home, path) == 0
    assert "Signature and dates: valid: q@1, signed by a trusted key" in capsys.readouterr().out


def test_explain_without_a_home_explains_the_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONNECTOR_HOME", raising=False)
    assert run_cli("policy", "explain", draft(tmp_path / "draft.yaml")) == 0
    out, err = capsys.readouterr()
    assert "Who: only member(s) voltcell" in out and "Signature" not in out
    assert "no home here" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id: x\nversion: [1\n", "bad.yaml:3: not valid YAML"),
        (policy_text("x", members="[v]") + "colour: red\n", "bad.yaml:10: unknown key 'colour'"),
    ],
)
def test_explain_of_a_malformed_file_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    path = write(tmp_path / "bad.yaml", text)
    assert run_cli("policy", "explain", path) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_explain_of_a_missing_file_says_what_to_give(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("policy", "explain", tmp_path / "gone.yaml") == 1
    assert "gone.yaml: no such file; give the path of a policy file" in capsys.readouterr().err


def test_diff_of_a_version_that_drops_a_column_says_so_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = draft(tmp_path / "old.yaml")
    new = draft(tmp_path / "new.yaml", columns="[plant, defect_code, defects, week]")
    assert run_cli("policy", "diff", old, new) == 0
    out = capsys.readouterr().out
    assert "NARROWING  columns: column part_no dropped: no longer shown" in out
    assert out.splitlines()[-1] == "0 widening, 1 narrowing: nothing widens"


def test_diff_of_a_version_that_adds_a_column_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = draft(tmp_path / "old.yaml")
    new = draft(tmp_path / "new.yaml", columns=COLUMNS.replace("]", ", supplier_price]"))
    assert run_cli("policy", "diff", old, new) == 1
    out = capsys.readouterr().out
    assert "WIDENING   columns: column supplier_price added: now shown in the clear" in out
    assert "ask for a second signature" in out


def test_diff_of_identical_files_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = draft(tmp_path / "old.yaml")
    assert run_cli("policy", "diff", old, old) == 0
    assert capsys.readouterr().out == "no change to what is granted\n"


def test_diff_of_folders_pairs_policies_by_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    draft(tmp_path / "old" / "a.yaml")
    draft(tmp_path / "new" / "renamed.yaml", columns="[plant]")
    assert run_cli("policy", "diff", tmp_path / "old", tmp_path / "new") == 0
    assert "column week dropped" in capsys.readouterr().out
    write(tmp_path / "new" / "extra.yaml", policy_text("extra", members="[axle]"))
    assert run_cli("policy", "diff", tmp_path / "old", tmp_path / "new", "--format", "json") == 1
    body = json.loads(capsys.readouterr().out)
    assert body["widens"] is True
    assert {"policy": "extra", "area": "policy", "direction": "widening"}.items() <= body[
        "changes"
    ][0].items()


def test_diff_of_unreadable_input_exits_2_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = draft(tmp_path / "old.yaml")
    bad = write(tmp_path / "bad.yaml", "id: x\nversion: [1\n")
    assert run_cli("policy", "diff", old, bad) == 2
    err = capsys.readouterr().err
    assert "bad.yaml:3: not valid YAML" in err and "Traceback" not in err
    assert run_cli("policy", "diff", old, tmp_path / "gone.yaml") == 2
    assert "gone.yaml: no such file or folder" in capsys.readouterr().err


def test_explain_and_diff_show_hidden_characters_of_a_policy_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = draft(tmp_path / "old.yaml")
    # A right-to-left override and a C1 control would reorder or hide what the lawyer reads.
    new = draft(tmp_path / "new.yaml", obligations=r'{terms: ["no resale\u202e\x9b2J"]}')
    for args in (("explain", new), ("explain", new, "--format", "json"), ("diff", old, new)):
        run_cli("policy", *args)
        out = capsys.readouterr().out
        assert "\u202e" not in out and "\u009b" not in out
        assert "202e" in out
