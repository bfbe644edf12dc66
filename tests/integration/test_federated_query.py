"""One question for many members over real servers on loopback: three answer, one refuses
by policy, one is down; the combined figures equal those of the answering members' files."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import pty
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connector.errors import DirectoryError, NotFederable
from connector.federated_plan import MEMBER_COLUMN
from connector.federated_sql import plan_federation
from connector.federation import (
    ANSWERED,
    REFUSED,
    TIMED_OUT,
    UNREACHABLE,
    WRONG_IDENTITY,
    FederatedQuery,
    FederatedResult,
    federation_report_of,
    resolve_targets,
)
from connector.server import RunningServer
from tests.conftest import Member, policy_text, run_cli, write_defects_csv

ANSWERING = {"sup-a": 200, "sup-b": 120, "sup-c": 90}
AGGREGATE_ONLY_ROWS, MIN_GROUP = 80, 12
SUM_QUERY = (
    "SELECT plant, sum(defects) AS total, count(defects) AS n, avg(defects) AS mean "
    "FROM part_defects GROUP BY plant"
)
PURPOSE = "quality-benchmarking"


@dataclass
class Federation:
    asker: Member
    members: dict[str, Member]
    servers: dict[str, RunningServer]
    files: dict[str, Path]
    folder: Path

    def ask(self, *specs: str, timeout: float = 20.0) -> FederatedQuery:
        return FederatedQuery.from_home(self.asker.home, specs, timeout=timeout)

    def audit_seq(self, member_id: str) -> int:
        return self.servers[member_id].provider.audit.head[0]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def federation(
    module_dir: Path,
    module_member: Callable[[str], Member],
    module_serve: Callable[[Member], RunningServer],
    dataspace: Path,
) -> Federation:
    asker = module_member("asker")
    members: dict[str, Member] = {}
    files: dict[str, Path] = {}
    for member_id, rows in {**ANSWERING, "sup-d": 50, "sup-f": AGGREGATE_ONLY_ROWS}.items():
        member = members[member_id] = module_member(member_id)
        files[member_id] = write_defects_csv(module_dir / f"{member_id}.csv", rows)
        member.ingest(files[member_id], "part_defects")
        grantee = "[someone-else]" if member_id == "sup-d" else "[asker]"
        extra = f"aggregate_only: {{min_group_size: {MIN_GROUP}}}\n" if member_id == "sup-f" else ""
        member.write_policy("q.yaml", policy_text("q", members=grantee) + extra)
    servers = {member_id: module_serve(member) for member_id, member in members.items()}
    authority = module_dir / "authority"
    authority.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy2(dataspace / name, authority / name)
    endpoints = {m: f"127.0.0.1:{s.port}" for m, s in servers.items()}
    endpoints["sup-e"] = f"127.0.0.1:{_free_port()}"  # down: nothing listens there
    endpoints["impostor"] = endpoints["sup-a"]  # sup-a's server, not impostor's certificate
    for member_id, endpoint in sorted(endpoints.items()):
        role = "oem" if member_id == "sup-f" else "supplier"
        args: list[str | Path] = [authority, member_id, "--endpoint", endpoint, "--role", role]
        assert run_cli("dataspace", "member", "add", *args) == 0
    published = module_dir / "directory.json"
    assert run_cli("dataspace", "publish", authority, "--out", published) == 0
    assert run_cli("directory", "update", "--home", asker.home, published) == 0
    return Federation(asker, members, servers, files, module_dir)


def expected_by_plant(files: list[Path]) -> dict[str, tuple[int, int]]:
    """plant -> (sum of defects, count) over the rows of the files themselves."""
    found: dict[str, tuple[int, int]] = {}
    for path in files:
        with path.open() as handle:
            for row in csv.DictReader(handle):
                total, count = found.get(row["plant"], (0, 0))
                found[row["plant"]] = (total + int(row["defects"]), count + 1)
    return found


def outcomes(result: FederatedResult) -> dict[str, str]:
    return {r.label: r.outcome for r in result.reports}


def test_combined_sum_count_avg_equal_the_answering_members_files(
    federation: Federation,
) -> None:
    query = federation.ask("sup-a", "sup-b", "sup-c", "sup-d", "sup-e")
    result = query.run(SUM_QUERY, PURPOSE)
    assert outcomes(result) == {
        "sup-a": ANSWERED, "sup-b": ANSWERED, "sup-c": ANSWERED,
        "sup-d": REFUSED, "sup-e": UNREACHABLE,
    }  # fmt: skip
    assert not result.complete
    refused = next(r for r in result.reports if r.label == "sup-d")
    assert "no policy grants dataset part_defects to you" in refused.detail
    expected = expected_by_plant([federation.files[m] for m in ANSWERING])
    rows = {r["plant"]: r for r in result.table.to_pylist()}
    assert result.table.column_names == ["plant", "total", "n", "mean"]
    assert set(rows) == set(expected)
    for plant, (total, count) in expected.items():
        assert rows[plant]["total"] == total
        assert rows[plant]["n"] == count
        assert rows[plant]["mean"] == total / count  # not an average of the members' averages
    for report in result.reports:
        if report.answered:
            assert report.receipt is not None and report.receipt.provider_id == report.label
    kept = federation_report_of(result.table)
    assert kept["complete"] is False and kept["kind"] == "aggregate"
    assert [(m["member"], m["outcome"]) for m in kept["members"]] == [
        (r.label, r.outcome) for r in result.reports
    ]


def test_require_all_fails_and_prints_no_answer(
    federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    home = federation.asker.home
    args = ["--to", "sup-a", "--to", "sup-d", "--to", "sup-e", "--purpose", PURPOSE]
    assert run_cli("query", "--home", home, *args, "--require-all", SUM_QUERY) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert "sup-d (127.0.0.1" in out.err and "refused" in out.err
    assert "sup-e (127.0.0.1" in out.err and "unreachable" in out.err
    assert "not every member answered" in out.err
    assert run_cli("query", "--home", home, *args, "--format", "json", SUM_QUERY) == 0
    out = capsys.readouterr()
    assert "INCOMPLETE: 1 of 3 members answered" in out.err
    assert len(out.out.splitlines()) == 4  # one line a plant


def test_a_plain_query_comes_back_as_a_union_with_member_first(federation: Federation) -> None:
    result = federation.ask("sup-a", "sup-b", "sup-c").run(
        "SELECT plant, defects FROM part_defects", PURPOSE
    )
    assert result.kind == "union" and result.complete
    assert result.table.column_names == [MEMBER_COLUMN, "plant", "defects"]
    members = result.table.column(MEMBER_COLUMN).to_pylist()
    assert {m: members.count(m) for m in ANSWERING} == ANSWERING
    assert members == sorted(members, key=list(ANSWERING).index)  # in the order asked


def test_an_endpoint_presenting_another_member_s_certificate_gets_nothing(
    federation: Federation,
) -> None:
    before = federation.audit_seq("sup-a")
    result = federation.ask("impostor").run(SUM_QUERY, PURPOSE)
    (report,) = result.reports
    assert report.outcome == WRONG_IDENTITY
    assert "spiffe://test-space/member/sup-a, not of member impostor" in report.detail
    assert result.table.num_rows == 0
    assert federation.audit_seq("sup-a") == before  # no request reached the connector


def test_by_role_per_member_and_all(federation: Federation) -> None:
    by_role = federation.ask("role:supplier")
    assert {t.label for t in by_role.targets} == {
        "sup-a", "sup-b", "sup-c", "sup-d", "sup-e", "impostor"
    }  # fmt: skip
    oem = federation.ask("role:oem").run(SUM_QUERY, PURPOSE, per_member=True)
    assert oem.kind == "per-member"
    assert oem.table.column_names[0] == MEMBER_COLUMN
    assert set(oem.table.column(MEMBER_COLUMN).to_pylist()) == {"sup-f"}
    assert oem.reports[0].min_group_size == MIN_GROUP


@pytest.mark.parametrize(
    "sql, words",
    [
        ("SELECT plant, median(defects) FROM part_defects GROUP BY plant", "median"),
        ("SELECT count(DISTINCT part_no) FROM part_defects", "counted once by each"),
        ("SELECT plant, string_agg(part_no, ',') FROM part_defects GROUP BY plant", "collects"),
        ("SELECT plant, stddev(defects) FROM part_defects GROUP BY plant", "sum(x * x)"),
        ("SELECT plant, sum(defects) FROM part_defects GROUP BY plant HAVING sum(defects) > 1",
         "HAVING"),
    ],
)  # fmt: skip
def test_what_cannot_be_combined_is_refused_before_any_member_is_asked(
    federation: Federation, sql: str, words: str
) -> None:
    before = {m: federation.audit_seq(m) for m in ANSWERING}
    with pytest.raises(NotFederable, match="cannot be combined across members") as refused:
        federation.ask("sup-a", "sup-b", "sup-c").run(sql, PURPOSE)
    assert words in str(refused.value)
    assert {m: federation.audit_seq(m) for m in ANSWERING} == before


def test_unknown_members_and_roles_are_named_before_any_member_is_asked(
    federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(DirectoryError, match="nobody is not a member"):
        federation.ask("sup-a", "nobody")
    with pytest.raises(DirectoryError, match="no member has role logistics"):
        federation.ask("role:logistics")
    args = ["--to", "sup-a", "--to", "ghost", "--purpose", PURPOSE, SUM_QUERY]
    assert run_cli("query", "--home", federation.asker.home, *args) == 1
    assert "ghost is not a member in the directory" in capsys.readouterr().err


def test_aggregate_only_members_dropped_groups_are_marked_incomplete(
    federation: Federation,
) -> None:
    sql = "SELECT defect_code, sum(defects) AS total FROM part_defects GROUP BY defect_code"
    result = federation.ask("sup-a", "sup-f").run(sql, PURPOSE)
    assert result.complete
    report = next(r for r in result.reports if r.label == "sup-f")
    assert report.min_group_size == MIN_GROUP
    # 80 rows over 7 codes: D0-D2 have 12 rows at sup-f, D3-D6 only 11 (dropped there).
    dropped = sorted(g["group"]["defect_code"] for g in result.incomplete_groups)
    assert dropped == ["D3", "D4", "D5", "D6"]
    assert all(g["members"] == ["sup-f"] for g in result.incomplete_groups)


def test_a_member_that_never_answers_times_out_on_its_own_deadline(
    federation: Federation,
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts connections into the backlog, never answers
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        targets = resolve_targets([address, f"127.0.0.1:{federation.servers['sup-a'].port}"])
        result = FederatedQuery(federation.asker.identity(), targets, timeout=1.0).run(
            SUM_QUERY, PURPOSE
        )
    assert [r.outcome for r in result.reports] == [TIMED_OUT, ANSWERED]
    assert result.reports[0].seconds < 5


@pytest.mark.parametrize("data_format", ["csv", "parquet", "arrow"])
def test_receipts_of_every_member_are_kept_and_verified(
    federation: Federation, tmp_path: Path, data_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / f"answer.{data_format}"
    args = ["--to", "sup-a", "--to", "sup-b", "--to", "sup-d", "--purpose", PURPOSE]
    home = federation.asker.home
    assert run_cli("query", "--home", home, *args, "--format", data_format,
                   "--output", output, SUM_QUERY) == 0  # fmt: skip
    receipts = output.with_name(output.name + ".receipts.json")
    document = json.loads(receipts.read_text())
    assert [m["outcome"] for m in document["members"]] == [ANSWERED, ANSWERED, REFUSED]
    capsys.readouterr()
    assert run_cli("receipt", "verify", receipts, "--data", output, "--home", home) == 0
    out = capsys.readouterr().out
    assert "2 receipts" in out and "sup-d (refused): no answer" in out
    if data_format == "csv":
        output.write_text(output.read_text().replace("Leipzig", "Leipzig2"))
    else:
        output.with_name(f"{output.name}.sup-b.arrow").write_bytes(b"changed")
    assert run_cli("receipt", "verify", receipts, "--data", output, "--home", home) == 1
    assert "NOT VALID" in capsys.readouterr().err


def _swap_labels(document: dict[str, Any]) -> None:
    first, second = document["members"][:2]
    first["member"], second["member"] = second["member"], first["member"]
    first["member_id"], second["member_id"] = second["member_id"], first["member_id"]


def _one_part_twice(document: dict[str, Any]) -> None:
    twice = dict(document["members"][0])
    twice["member"] = twice["member_id"] = "sup-d"
    document["members"][2] = twice


def _plan_cut(document: dict[str, Any]) -> None:
    document["plan"]["limit"] = 1


def _other_query(document: dict[str, Any]) -> None:
    document["sql"] = SUM_QUERY.replace("sum(", "max(")
    document["plan"] = plan_federation(document["sql"]).to_json()


@pytest.fixture(scope="module")
def signed_answer(federation: Federation) -> Path:
    """The folder of one real answer of sup-a, sup-b and sup-d (refused), its receipts file
    and the members' parts: each tampering test changes a copy of its own."""
    output = federation.folder / "tamper" / "answer.arrow"
    output.parent.mkdir()
    args = ["--to", "sup-a", "--to", "sup-b", "--to", "sup-d", "--purpose", PURPOSE]
    home = federation.asker.home
    assert run_cli("query", "--home", home, *args, "--output", output, SUM_QUERY) == 0
    receipts = output.with_name(output.name + ".receipts.json")
    assert run_cli("receipt", "verify", receipts, "--home", home) == 0  # untampered: valid
    return output.parent


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_swap_labels, "signed by sup-"),
        (_one_part_twice, "answers twice"),
        (_plan_cut, "not the one its query makes"),
        (_other_query, "answers another query"),
    ],
)
def test_a_receipts_file_states_nothing_its_receipts_do_not_sign(
    federation: Federation,
    signed_answer: Path,
    tmp_path: Path,
    tamper: Callable[[dict[str, Any]], None],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Without --data only the receipts are checked: the unsigned plan, labels and list of
    # parts must still agree with what the members signed.
    shutil.copytree(signed_answer, tmp_path, dirs_exist_ok=True)
    home, receipts = federation.asker.home, tmp_path / "answer.arrow.receipts.json"
    document = json.loads(receipts.read_text())
    tamper(document)
    receipts.write_text(json.dumps(document))
    capsys.readouterr()
    assert run_cli("receipt", "verify", receipts, "--home", home) == 1
    assert message in capsys.readouterr().err


def test_progress_is_shown_on_a_terminal_only(
    federation: Federation, capsys: pytest.CaptureFixture[str]
) -> None:
    args: list[str | Path] = ["--home", federation.asker.home, "--to", "sup-a", "--to", "sup-b"]
    leader, follower = pty.openpty()
    with os.fdopen(follower, "w") as terminal, contextlib.redirect_stderr(terminal):
        assert run_cli("query", *args, "--purpose", PURPOSE, SUM_QUERY) == 0
    shown = os.read(leader, 65536).decode()
    os.close(leader)
    assert "\r1/2 members done" in shown and "2/2 members done, 8 rows so far" in shown
    assert run_cli("query", *args, "--purpose", PURPOSE, SUM_QUERY) == 0
    assert "members done" not in capsys.readouterr().err  # not a terminal: no progress


def test_a_row_limit_cuts_each_member_and_marks_the_union_incomplete(
    federation: Federation,
) -> None:
    query = federation.ask("sup-a", "sup-b")
    result = query.run("SELECT plant FROM part_defects", PURPOSE, max_rows=5)
    assert [(r.rows, r.cut) for r in result.reports] == [(5, True), (5, True)]
    assert not result.complete and "cut at the limit" in result.reports[0].detail
    with pytest.raises(NotFederable, match="row limit would cut members' partial groups"):
        query.run(SUM_QUERY, PURPOSE, max_rows=5)


def test_an_answer_with_its_own_member_column_is_left_out_with_the_reason(
    federation: Federation,
) -> None:
    result = federation.ask("sup-a").run("SELECT plant AS _member FROM part_defects", PURPOSE)
    (report,) = result.reports
    assert report.outcome == "failed" and "column named _member" in report.detail
    assert result.table.num_rows == 0
