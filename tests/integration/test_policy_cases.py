"""`connector policy test`: plain YAML cases decided and shaped by the server's own code.

The example case files pass against the example homes, with either engine; a wrong
expectation fails the run; `at` moves which policies are in force; drafts are tested
unsigned and said so; a bad case file gets its file, line and fix; the home is unchanged.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from connector.policy.opa import opa_namespace
from tests.conftest import DATASPACE, Member, policy_text, run_cli, write_defects_csv
from tests.opa_endpoint import opa_endpoint

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EXAMPLE_DATA = {
    "northwind-motors": ("part_defects.csv", "part_defects"),
    "axle-works": ("deliveries.csv", "deliveries"),
    "voltcell": ("cell_tests.json", "cell_tests"),
}
CaptureFixture = pytest.CaptureFixture[str]


@pytest.fixture(scope="module")
def example_homes(module_member: Callable[[str], Member]) -> dict[str, Member]:
    """The three example members with their example data and signed example policies."""
    homes = {}
    for member_id, (data_file, dataset) in EXAMPLE_DATA.items():
        member = homes[member_id] = module_member(member_id)
        member.ingest(EXAMPLES / member_id / data_file, dataset)
        for policy in sorted((EXAMPLES / member_id / "policies").glob("*.yaml")):
            member.write_policy(policy.name, policy.read_text(encoding="utf-8"))
    return homes


def _policy_test(
    capsys: CaptureFixture, home: Path, *args: str | Path
) -> tuple[int, list[str], str]:
    """Run `policy test` in-process: its exit status, the lines it printed, its stderr."""
    capsys.readouterr()
    status = run_cli("policy", "test", "--home", home, *args)
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


def _cases(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _home_state(home: Path) -> dict[str, tuple[str, int]]:
    """Every file of the home: its content digest and modification time."""
    return {
        str(p.relative_to(home)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(home.rglob("*"))
        if p.is_file()
    }


@dataclass(frozen=True)
class ExampleRun:
    """One `policy test` run of a member's example cases with the embedded engine."""

    status: int
    lines: list[str]
    home_before: dict[str, tuple[str, int]]
    home_after: dict[str, tuple[str, int]]


@pytest.fixture(scope="module")
def example_runs(example_homes: dict[str, Member]) -> dict[str, ExampleRun]:
    """Each member's example cases run once against its home (and the home's state around
    the run): the tests of the results, of the home and of the OPA engine read them."""
    runs = {}
    for member_id, member in example_homes.items():
        before = _home_state(member.home)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            status = run_cli(
                "policy", "test", "--home", member.home, EXAMPLES / member_id / "policy-cases.yaml"
            )
        lines = printed.getvalue().splitlines()
        runs[member_id] = ExampleRun(status, lines, before, _home_state(member.home))
    return runs


@pytest.mark.parametrize("member_id", list(EXAMPLE_DATA))
def test_the_example_cases_pass_against_the_example_policies(
    example_runs: dict[str, ExampleRun], member_id: str
) -> None:
    cases = EXAMPLES / member_id / "policy-cases.yaml"
    status, lines = example_runs[member_id].status, example_runs[member_id].lines
    count = len([line for line in cases.read_text().splitlines() if line.startswith("- name:")])
    assert status == 0, lines
    assert lines[-1] == f"{count} passed, 0 failed"
    assert len([line for line in lines if line.startswith("PASS ")]) == count
    assert "the signed policies" in lines[0]


def test_a_wrong_expectation_reports_two_passed_one_failed_and_exits_non_zero(
    example_homes: dict[str, Member], capsys: CaptureFixture, tmp_path: Path
) -> None:
    cases = _cases(
        tmp_path / "cases.yaml",
        """\
        - name: prices stay confidential
          member: axle-works
          purpose: quality-benchmarking
          sql: SELECT avg(unit_price_eur) FROM part_defects
          expect: deny
        - name: prices wrongly expected
          member: axle-works
          purpose: quality-benchmarking
          sql: SELECT part_no, avg(unit_price_eur) AS price FROM part_defects GROUP BY part_no
          expect: allow
        - name: defects per plant
          member: axle-works
          purpose: quality-benchmarking
          sql: SELECT plant, sum(defects) AS defects FROM part_defects GROUP BY plant
          expect: {decision: allow, columns: [defects, plant]}
        """,
    )
    status, lines, _ = _policy_test(capsys, example_homes["northwind-motors"].home, cases)
    assert status == 1
    assert lines[-1] == "2 passed, 1 failed"
    (failed,) = [line for line in lines if line.startswith("FAIL ")]
    assert failed.startswith("FAIL prices wrongly expected: expected allow, got deny (")
    assert "unit_price_eur" in failed


@pytest.mark.parametrize(
    ("expect", "got"),
    [
        ("{decision: allow, columns: [plant]}", "expected columns [plant], got [plant, n]"),
        ("{decision: allow, masked: {plant: hash}}", "expected masked {plant: hash}, got {}"),
        ("{decision: deny, reason: nothing like this}", "expected deny, got allow (columns"),
    ],
)
def test_columns_masks_and_reasons_are_compared_exactly(
    example_homes: dict[str, Member],
    capsys: CaptureFixture,
    tmp_path: Path,
    expect: str,
    got: str,
) -> None:
    cases = _cases(
        tmp_path / "cases.yaml",
        f"""\
        - name: per plant
          member: axle-works
          purpose: quality-benchmarking
          sql: SELECT plant, count(*) AS n FROM part_defects GROUP BY plant
          expect: {expect}
        """,
    )
    status, lines, _ = _policy_test(capsys, example_homes["northwind-motors"].home, cases)
    assert status == 1 and lines[-1] == "0 passed, 1 failed"
    assert got in lines[-2]


def test_a_reason_must_be_in_the_denial(
    example_homes: dict[str, Member], capsys: CaptureFixture, tmp_path: Path
) -> None:
    cases = _cases(
        tmp_path / "cases.yaml",
        """\
        - name: marketing
          member: axle-works
          purpose: marketing
          sql: SELECT plant FROM part_defects
          expect: {decision: deny, reason: a column is not allowed}
        """,
    )
    status, lines, _ = _policy_test(capsys, example_homes["northwind-motors"].home, cases)
    assert status == 1
    assert "expected a reason containing 'a column is not allowed', got deny (" in lines[-2]
    assert "purpose marketing" in lines[-2]


def test_masked_columns_are_those_the_peer_receives_masked(
    example_homes: dict[str, Member], capsys: CaptureFixture, tmp_path: Path
) -> None:
    cases = _cases(
        tmp_path / "cases.yaml",
        """\
        - name: hashed supplier, clear plant
          member: voltcell
          purpose: quality-benchmarking
          sql: SELECT plant, supplier, count(*) AS k FROM part_defects GROUP BY plant, supplier
          expect: {decision: allow, columns: [plant, supplier, k], masked: {supplier: hash}}
        - name: the Debrecen plant is filtered out, not refused
          member: voltcell
          purpose: quality-benchmarking
          sql: SELECT plant, count(*) AS k FROM part_defects WHERE plant = 'Debrecen' GROUP BY plant
          expect: {decision: allow, columns: [plant, k], masked: {}}
        """,
    )
    status, lines, _ = _policy_test(capsys, example_homes["northwind-motors"].home, cases)
    assert (status, lines[-1]) == (0, "2 passed, 0 failed"), lines


@pytest.mark.parametrize("member_id", list(EXAMPLE_DATA))
def test_a_case_run_leaves_the_home_unchanged(
    example_homes: dict[str, Member], example_runs: dict[str, ExampleRun], member_id: str
) -> None:
    # Allowed plain and shaped (masked, aggregate-only) queries, denials and an `at` case.
    run = example_runs[member_id]
    assert run.status == 0
    assert run.home_before and run.home_after == run.home_before
    assert not (example_homes[member_id].home / "audit" / "audit.jsonl").exists()


def test_at_changes_which_version_of_a_policy_is_in_force(
    make_member: Callable[[str], Member], capsys: CaptureFixture, tmp_path: Path
) -> None:
    owner = make_member("carmaker")
    owner.ingest(write_defects_csv(tmp_path / "d.csv"), "part_defects")
    today = dt.date.today()
    switch = today + dt.timedelta(days=30)
    owner.write_policy(
        "q1.yaml",
        policy_text("q", members="[supplier-a]", columns="[plant]", valid_until=str(switch)),
    )
    owner.write_policy(
        "q2.yaml",
        policy_text(
            "q", members="[supplier-a]", columns="[plant, defects]", version=2,
            valid_from=str(switch),
        ),
    )  # fmt: skip
    sql = "SELECT plant, defects FROM part_defects"
    cases = _cases(
        tmp_path / "cases.yaml",
        f"""\
        - name: now, version 1 grants plant only
          member: supplier-a
          purpose: quality-benchmarking
          sql: {sql}
          expect: {{decision: deny, reason: defects}}
        - name: after the switch, version 2 grants defects
          member: supplier-a
          purpose: quality-benchmarking
          sql: {sql}
          at: {switch + dt.timedelta(days=1)}
          expect: {{decision: allow, columns: [plant, defects]}}
        - name: before version 1, nothing
          member: supplier-a
          purpose: quality-benchmarking
          sql: SELECT plant FROM part_defects
          at: {today - dt.timedelta(days=10)}
          expect: deny
        """,
    )
    status, lines, _ = _policy_test(capsys, owner.home, cases)
    assert (status, lines[-1]) == (0, "3 passed, 0 failed"), lines


def test_unsigned_drafts_are_tested_when_asked_and_said_to_be_unsigned(
    example_homes: dict[str, Member], capsys: CaptureFixture, tmp_path: Path
) -> None:
    drafts = tmp_path / "drafts"
    drafts.mkdir()
    signed = (EXAMPLES / "axle-works" / "policies" / "northwind-deliveries.yaml").read_text()
    (drafts / "deliveries.yaml").write_text(
        signed.replace("version: 1", "version: 2").replace("on_time]", "on_time, margin_pct]")
    )
    cases = _cases(
        tmp_path / "cases.yaml",
        """\
        - name: the draft shares margins
          member: northwind-motors
          purpose: supply-planning
          sql: SELECT avg(margin_pct) AS margin FROM deliveries
          expect: {decision: allow, columns: [margin]}
        """,
    )
    home = example_homes["axle-works"].home
    status, lines, _ = _policy_test(capsys, home, "--policies", drafts, cases)
    assert (status, lines[-1]) == (0, "1 passed, 0 failed"), lines
    assert "UNSIGNED DRAFTS" in lines[0] and str(drafts) in lines[0]
    status, lines, _ = _policy_test(capsys, home, cases)  # the signed policy does not
    assert (status, lines[-1]) == (1, "0 passed, 1 failed")
    assert "UNSIGNED" not in lines[0]


def test_a_malformed_draft_names_its_file_and_line(
    example_homes: dict[str, Member], capsys: CaptureFixture, tmp_path: Path
) -> None:
    drafts = tmp_path / "drafts"
    drafts.mkdir()
    (drafts / "bad.yaml").write_text("id: bad\nversion: 1\ncolums: [a]\n")
    cases = EXAMPLES / "axle-works" / "policy-cases.yaml"
    status, _, err = _policy_test(
        capsys, example_homes["axle-works"].home, "--policies", drafts, cases
    )
    assert status == 1
    assert f"{drafts / 'bad.yaml'}:3: unknown key 'colums'" in err
    assert "Traceback" not in err


BAD_CASES = [
    ("- name: a\n  member: x\n  purpose: p\n  sql: SELECT 1\n  expect: allow\n  whom: x\n",
     6, "unknown key 'whom' in case 1"),
    ("- name: a\n  member: x\n  purpose: p\n  sql: SELECT 1\n", 1, "lacks expect"),
    ("- name: a\n  member: x\n  purpose: p\n  sql: SELECT 1\n  expect: maybe\n",
     5, "must be allow or deny"),
    ("- name: a\n  member: x\n  purpose: p\n  sql: SELECT 1\n  expect: {decision: allow, "
     "reason: x}\n", 5, "reason in the expect of case 'a' applies only to decision deny"),
    ("- name: a\n  member: x\n  purpose: p\n  sql: SELECT 1\n  expect: {decision: deny, "
     "columns: [a]}\n", 5, "columns in the expect of case 'a' applies only to decision allow"),
    ("- name: a\n  member: x\n  purpose: p\n  sql: SELECT 1\n  expect: {decision: allow, "
     "masked: {a: scramble}}\n", 5, "mask 'scramble' of a"),
    ("- name: a\n  member: x\n  purpose: p\n  sql: SELECT 1\n  at: 2026-13-01\n  expect: deny\n",
     5, "not a date in the calendar"),
    ("- name: a\n  member: Not A Member\n  purpose: p\n  sql: SELECT 1\n  expect: deny\n",
     2, "member of case 'a'"),
    ("- name: a\n  member: x\n  purpose: p\n  sql: SELECT 1\n  expect: deny\n"
     "- name: a\n  member: x\n  purpose: p\n  sql: SELECT 2\n  expect: deny\n",
     6, "case name 'a' is also used on line 1"),
    ("name: a\nmember: x\n", 1, "a case file is a non-empty list of cases"),
    ("- name: a\n  member: [x\n", 3, "not valid YAML"),
    ("- &x {name: a}\n", 1, "anchors and aliases"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "words"), BAD_CASES)
def test_a_bad_case_file_gets_its_file_line_and_fix_never_a_traceback(
    example_homes: dict[str, Member],
    capsys: CaptureFixture,
    tmp_path: Path,
    text: str,
    line: int,
    words: str,
) -> None:
    cases = tmp_path / "bad.yaml"
    cases.write_text(text, encoding="utf-8")
    status, out, err = _policy_test(capsys, example_homes["axle-works"].home, cases)
    assert status == 1 and out == []
    assert f"connector: error: {cases}:{line}: " in err, err
    assert words in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_the_example_cases_give_identical_results_with_the_opa_engine(
    example_homes: dict[str, Member],
    example_runs: dict[str, ExampleRun],
    capsys: CaptureFixture,
    tmp_path: Path,
) -> None:
    for member_id in EXAMPLE_DATA:
        cases = EXAMPLES / member_id / "policy-cases.yaml"
        home = tmp_path / member_id
        shutil.copytree(example_homes[member_id].home, home)
        embedded = example_runs[member_id].status, example_runs[member_id].lines
        config = home / "connector.toml"
        text = config.read_text()
        with opa_endpoint() as (url, state):
            config.write_text(
                text.replace('engine = "embedded"', f'engine = "opa"\nopa_url = "{url}"')
            )
            with_opa = _policy_test(capsys, home, cases)
            pushed_under = set(state.data["connector_data"])
        assert with_opa[1][1].startswith("engine: opa")
        assert (with_opa[0], with_opa[1][2:]) == (embedded[0], embedded[1][2:])
        assert embedded[0] == 0 and state.requests > 0
        # Under names of its own: the connector's names in OPA keep the policies in force.
        assert opa_namespace(DATASPACE, member_id) not in pushed_under
