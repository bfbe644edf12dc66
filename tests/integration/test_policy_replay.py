"""`connector policy replay`: the traffic recorded by a real server over mTLS, decided again
under draft policies; only changed requests listed, and nothing in the home written."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from connector.audit_chain import read_entries
from connector.errors import PermissionDenied, QueryRejected
from connector.server import RunningServer
from tests.conftest import Member, connect, policy_text, run_cli, write_defects_csv

QUALITY, AUDIT = "quality-benchmarking", "supplier-audit"
BOTH = f"[{QUALITY}, {AUDIT}]"


@pytest.fixture
def recorded(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
) -> tuple[Member, dict[str, list[int]]]:
    """carmaker's home after a real server answered supplier-a's requests under two purposes;
    the sequence numbers of the entries by purpose (and "catalog"). The server is stopped."""
    provider, grantee = make_member("carmaker"), make_member("supplier-a")
    provider.ingest(write_defects_csv(tmp_path / "d.csv"), "part_defects")
    provider.write_policy("q.yaml", policy_text("q", members="[supplier-a]", purposes=BOTH))
    server = serve(provider)
    with connect(server, grantee) as peer:
        peer.catalog()
        peer.query("SELECT plant, week FROM part_defects", QUALITY)
        peer.query("SELECT * FROM part_defects", QUALITY)
        with pytest.raises(PermissionDenied):
            peer.query("SELECT supplier_price FROM part_defects", QUALITY)
        with pytest.raises(QueryRejected):
            peer.query("SELECT * FROM read_csv('/etc/passwd')", QUALITY)
        peer.query("SELECT plant, count(*) AS n FROM part_defects GROUP BY plant", AUDIT)
        peer.explain("SELECT defects FROM part_defects", AUDIT)
        peer.query("SELECT part_no FROM part_defects", AUDIT)
        # Answered, but held by digest in the log (a control character): not replayable.
        peer.query("SELECT plant FROM part_defects -- \x01", QUALITY)
    server.stop(grace=1)
    by_purpose: dict[str, list[int]] = {}
    for entry in read_entries(provider.home / "audit" / "audit.jsonl"):
        if entry["type"] == "request":
            key = entry["purpose"] if entry["kind"] != "catalog" else "catalog"
            by_purpose.setdefault(key, []).append(entry["seq"])
    return provider, by_purpose


def _home_bytes(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in home.rglob("*") if p.is_file()}


def _draft(folder: Path, text: str, name: str = "q.yaml") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return folder


def _replay(
    home: Path, drafts: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[list[str], str]:
    capsys.readouterr()
    assert run_cli("policy", "replay", "--home", home, "--policies", drafts, *extra) == 0
    out = capsys.readouterr().out
    return out.splitlines(), out


def _changed(lines: list[str]) -> dict[int, str]:
    found = {}
    for line in lines:
        match = re.match(r"CHANGED entry (\d+) .*: (.*)$", line)
        if match:
            found[int(match.group(1))] = match.group(2)
    return found


def test_withdrawn_purpose_lists_exactly_its_requests_and_writes_nothing(
    tmp_path: Path,
    recorded: tuple[Member, dict[str, list[int]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider, by_purpose = recorded
    before = _home_bytes(provider.home)
    drafts = _draft(
        tmp_path / "drafts",
        policy_text("q", members="[supplier-a]", purposes=f"[{QUALITY}]", version=2),
    )
    lines, out = _replay(provider.home, drafts, capsys)
    changed = _changed(lines)
    assert sorted(changed) == by_purpose[AUDIT]
    assert set(changed.values()) == {"allowed -> denied"}
    assert "query: SELECT part_no FROM part_defects" in out
    assert "by supplier-a, purpose supplier-audit" in out
    assert any(line.startswith("  reason: ") and AUDIT in line for line in lines), out
    assert "note: unsigned drafts: q.yaml" in out
    assert re.search(r"NOT REPLAYABLE entry \d+ \(line \d+\) by supplier-a: the query", out)
    assert lines[-1] == (
        "summary: 7 requests replayed: 3 would change (3 allowed -> denied, 0 denied -> allowed, "
        "0 columns differ, 0 masks differ), 4 unchanged; 1 not replayable; "
        "1 catalog requests have no query to replay"
    )
    assert _home_bytes(provider.home) == before


def test_widening_masking_and_narrowing_columns_are_each_named(
    tmp_path: Path,
    recorded: tuple[Member, dict[str, list[int]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider, by_purpose = recorded
    before = _home_bytes(provider.home)
    # Drops week, masks part_no, adds supplier_price: each changes different requests.
    draft = policy_text(
        "q",
        members="[supplier-a]",
        purposes=BOTH,
        columns="[plant, defect_code, defects, supplier_price]",
        version=2,
    )
    drafts = _draft(tmp_path / "drafts", draft + "  mask: {part_no: hash}\n")
    lines, _ = _replay(provider.home, drafts, capsys, "--at", "now")
    changed = _changed(lines)
    quality = by_purpose[QUALITY]
    audit = by_purpose[AUDIT]
    # quality: plant+week now denied; SELECT * gets other columns; supplier_price now allowed.
    assert changed[quality[0]] == "allowed -> denied"
    assert changed[quality[1]] == "columns differ, masks differ"
    assert changed[quality[2]] == "denied -> allowed"
    assert changed[audit[2]] == "masks differ"  # SELECT part_no: masked now
    assert set(changed) == {quality[0], quality[1], quality[2], audit[2]}, "\n".join(lines)
    assert "  draft masked in part_defects: part_no (hash)" in lines
    assert "as of now" in lines[0]
    assert _home_bytes(provider.home) == before


def test_since_skips_older_requests(
    tmp_path: Path,
    recorded: tuple[Member, dict[str, list[int]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider, _ = recorded
    drafts = _draft(tmp_path / "drafts", policy_text("q", members="[supplier-b]"))
    lines, _ = _replay(provider.home, drafts, capsys, "--since", "2999-01-01")
    assert lines[-1].startswith("summary: 0 requests replayed: 0 would change")


def test_malformed_log_and_draft_get_file_line_and_fix(
    tmp_path: Path,
    recorded: tuple[Member, dict[str, list[int]]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider, _ = recorded
    drafts = _draft(tmp_path / "drafts", policy_text("q", members="[supplier-a]"))
    broken = _draft(tmp_path / "broken", "id: q\nversion: 2\ncolums: [plant]\n")
    capsys.readouterr()
    assert run_cli("policy", "replay", "--home", provider.home, "--policies", broken) == 1
    err = capsys.readouterr().err
    assert f"{broken / 'q.yaml'}:3: unknown key 'colums'" in err and "Traceback" not in err
    log = provider.home / "audit" / "audit.jsonl"
    entries = log.read_text().splitlines()
    log.write_text("\n".join([*entries[:2], "{not json", *entries[2:]]) + "\n")
    assert run_cli("policy", "replay", "--home", provider.home, "--policies", drafts) == 1
    err = capsys.readouterr().err
    assert f"{log}: line 3 is not a JSON entry" in err
    assert "connector audit verify" in err and "Traceback" not in err
    shaped = [*entries[:2], entries[2].replace('"columns":{"', '"columns":{"x":7,"', 1)]
    shaped += entries[3:]
    log.write_text("\n".join(shaped) + "\n")
    assert run_cli("policy", "replay", "--home", provider.home, "--policies", drafts) == 1
    err = capsys.readouterr().err
    assert f"{log}: line 3 (entry 3) has a field of the wrong form" in err, err
    assert "Traceback" not in err
    assert run_cli("policy", "replay", "--home", provider.home, "--policies", tmp_path / "no") == 1
    assert "is not a folder" in capsys.readouterr().err
