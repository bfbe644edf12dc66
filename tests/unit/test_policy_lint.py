"""Each lint rule: the mistake is found on its line, with a fix; a good policy has none."""

from __future__ import annotations

import datetime as dt
import hashlib
import textwrap
from pathlib import Path

import pytest

from connector.policy.draft import DraftTerms, draft_text
from connector.policy.lint import lint_files
from connector.policy.lint_draft import Finding, HomeFacts, Severity
from connector.policy.model import parse_policy
from connector.policy.versions import VersionRecord
from connector.store import ColumnInfo, DatasetInfo

NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
DEFECTS = DatasetInfo(
    "part_defects",
    "defects",
    10,
    (
        ColumnInfo("plant", "VARCHAR"),
        ColumnInfo("supplier", "VARCHAR"),
        ColumnInfo("defects", "BIGINT"),
        ColumnInfo("week", "DATE"),
    ),
    NOW,
)
GOOD = """\
id: q
version: 2
description: defects for supplier-a
datasets: [part_defects]
grantees: {members: [supplier-a]}
purposes: [quality]
valid: {from: 2026-01-01, until: 2027-01-01}
columns:
  allow: [plant, defects, week]
"""


def _home(**changes: object) -> HomeFacts:
    facts = {"datasets": {"part_defects": DEFECTS}, "own_member": "carmaker", "now": NOW}
    facts.update(changes)
    return HomeFacts(**facts)  # type: ignore[arg-type]


def _lint(tmp_path: Path, text: str, home: HomeFacts | None = None) -> list[Finding]:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return lint_files([path], home or _home())


def _one(findings: list[Finding], needle: str) -> Finding:
    found = [f for f in findings if needle in f.message]
    assert len(found) == 1, [f.render() for f in findings]
    return found[0]


def test_a_good_policy_has_no_finding(tmp_path: Path) -> None:
    assert _lint(tmp_path, GOOD) == []


def test_unknown_key_with_did_you_mean_and_the_rest_still_checked(tmp_path: Path) -> None:
    text = GOOD.replace("columns:", "colums_typo: 1\ncolumns:").replace("defects,", "defcts,")
    findings = _lint(tmp_path, text)
    unknown = _one(findings, "unknown key 'colums_typo'")
    assert (unknown.line, unknown.severity) == (8, Severity.ERROR)
    assert "did you mean 'columns'?" in unknown.fix
    assert "did you mean defects?" in _one(findings, "column defcts").fix


def test_unknown_nested_key(tmp_path: Path) -> None:
    text = GOOD.replace("{members: [supplier-a]}", "{member: [supplier-a]}")
    findings = _lint(tmp_path, text)
    assert "did you mean 'members'?" in _one(findings, "unknown key 'member'").fix
    assert _one(findings, "missing key 'members'").line == 5


def test_missing_top_key(tmp_path: Path) -> None:
    finding = _one(_lint(tmp_path, GOOD.replace("purposes: [quality]\n", "")), "missing key")
    assert "purposes: [" in finding.fix


def test_unknown_dataset_with_did_you_mean_grants_nothing(tmp_path: Path) -> None:
    findings = _lint(tmp_path, GOOD.replace("[part_defects]", "[part_defect]"))
    finding = _one(findings, "dataset part_defect is not")
    assert (finding.line, "did you mean part_defects?" in finding.fix) == (4, True)
    assert _one(findings, "grants nothing").severity is Severity.ERROR


def test_unknown_column_with_did_you_mean(tmp_path: Path) -> None:
    finding = _one(_lint(tmp_path, GOOD.replace("plant,", "plnt,")), "column plnt")
    assert (finding.line, finding.severity) == (9, Severity.ERROR)
    assert "did you mean plant?" in finding.fix


def test_no_column_exists_grants_nothing(tmp_path: Path) -> None:
    findings = _lint(tmp_path, GOOD.replace("[plant, defects, week]", "[a1, b2]"))
    assert _one(findings, "grants nothing").line == 8


def test_column_allowed_and_masked_is_reported_once(tmp_path: Path) -> None:
    findings = _lint(tmp_path, GOOD + "  mask: {plant: hash}\n")
    finding = _one(findings, "both allowed in the clear and masked")
    assert finding.line == 10
    assert "columns.allow" in finding.fix


def test_row_filter_on_a_missing_column(tmp_path: Path) -> None:
    finding = _one(
        _lint(tmp_path, GOOD + "rows: {where: {plants: [Leipzig]}}\n"), "names column plants"
    )
    assert (finding.line, "did you mean plant?" in finding.fix) == (10, True)


@pytest.mark.parametrize(
    ("where", "needle", "fix"),
    [
        ("{week: {gte: March}}", "week (DATE) holds 'March'", "like 2026-01-31"),
        ("{defects: [many]}", "defects (BIGINT) holds 'many'", "like 10"),
        ("{plant: [3]}", "plant (VARCHAR) holds 3", "quoted"),
    ],
)
def test_row_filter_value_that_does_not_fit_the_column(
    tmp_path: Path, where: str, needle: str, fix: str
) -> None:
    finding = _one(_lint(tmp_path, GOOD + f"rows:\n  where: {where}\n"), needle)
    assert (finding.line, finding.severity, fix in finding.fix) == (11, Severity.ERROR, True)


def test_masked_column_in_a_row_filter(tmp_path: Path) -> None:
    text = GOOD + "  mask: {supplier: hash}\nrows: {where: {supplier: [acme]}}\n"
    finding = _one(_lint(tmp_path, text), "masked column supplier")
    assert (finding.line, finding.severity) == (11, Severity.WARNING)


def test_until_before_from(tmp_path: Path) -> None:
    text = GOOD.replace("until: 2027-01-01", "until: 2025-01-01")
    finding = _one(_lint(tmp_path, text), "is not after valid.from")
    assert (finding.line, "until: 2027-06-01" in finding.fix) == (7, True)


def test_until_already_past(tmp_path: Path) -> None:
    text = GOOD.replace(
        "from: 2026-01-01, until: 2027-01-01", "from: 2025-01-01, until: 2026-02-01"
    )
    finding = _one(_lint(tmp_path, text), "already past")
    assert (finding.line, finding.severity) == (7, Severity.ERROR)


def test_purpose_with_capitals_is_a_warning(tmp_path: Path) -> None:
    finding = _one(_lint(tmp_path, GOOD.replace("[quality]", "[Supplier Rating]")), "purpose")
    assert (finding.severity, "'supplier-rating'" in finding.fix) == (Severity.WARNING, True)


def test_grantee_that_is_this_home_or_revoked(tmp_path: Path) -> None:
    text = GOOD.replace("[supplier-a]", "[carmaker, gone]")
    findings = _lint(tmp_path, text, _home(revoked_members=frozenset({"gone"})))
    assert _one(findings, "own member id").severity is Severity.WARNING
    assert _one(findings, "revoked").severity is Severity.ERROR


def test_duplicate_ids_across_files(tmp_path: Path) -> None:
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(GOOD)
    second.write_text(GOOD.replace("defects for", "also defects for"))
    finding = _one(lint_files([first, second], _home()), "policy id q is also in")
    assert (finding.file, finding.line, finding.severity) == (second, 1, Severity.ERROR)


def test_version_lower_than_the_one_in_force(tmp_path: Path) -> None:
    record = VersionRecord(3, hashlib.sha256(b"other").hexdigest())
    finding = _one(_lint(tmp_path, GOOD, _home(remembered={"q": record})), "older than version 3")
    assert (finding.line, "above 3" in finding.fix) == (2, True)


def test_version_not_above_the_one_signed_before(tmp_path: Path) -> None:
    signed_path = tmp_path / "signed.yaml"
    signed_path.write_text(GOOD.replace("version: 2", "version: 5"))
    signed = parse_policy(signed_path)
    finding = _one(_lint(tmp_path, GOOD, _home(signed=[signed])), "not above version 5")
    assert (finding.line, finding.fix) == (2, "set `version: 6`")


def test_policies_refused_together_by_the_decision_library(tmp_path: Path) -> None:
    other_path = tmp_path / "other.yaml"
    other_path.write_text(GOOD.replace("id: q", "id: r") + "rows: {where: {plant: [Leipzig]}}\n")
    home = _home(in_force=[parse_policy(other_path)])
    finding = _one(_lint(tmp_path, GOOD, home), "refused together at query time")
    assert "different masks, row filters" in finding.message
    # Different purposes never apply together: no conflict.
    assert _lint(tmp_path, GOOD.replace("[quality]", "[audit]"), home) == []


@pytest.mark.parametrize(
    ("setting", "severity"), [("warn", Severity.WARNING), ("refuse", Severity.ERROR)]
)
def test_masked_here_clear_there(tmp_path: Path, setting: str, severity: Severity) -> None:
    other_path = tmp_path / "other.yaml"
    other_path.write_text(GOOD.replace("id: q", "id: r").replace("defects, week]", "supplier]"))
    home = _home(in_force=[parse_policy(other_path)], mask_consistency=setting)
    text = GOOD + "  mask: {supplier: hash}\n"
    finding = _one(_lint(tmp_path, text, home), "column supplier of dataset part_defects is masked")
    assert (finding.line, finding.severity) == (10, severity)


@pytest.mark.parametrize(
    "text",
    ["", "- a list\n", "id: [\n", "a: &x 1\nb: *x\n", "id: !!python/object x\n", "\xff"],
)
def test_malformed_input_is_a_finding_never_a_traceback(tmp_path: Path, text: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(text.encode("latin-1"))
    findings = lint_files([path], _home())
    assert findings and all(f.severity is Severity.ERROR and f.fix for f in findings)


def test_datasets_unreadable_skips_data_checks(tmp_path: Path) -> None:
    assert _lint(tmp_path, GOOD.replace("plant,", "plnt,"), _home(datasets=None)) == []


def test_a_draft_lints_clean(tmp_path: Path) -> None:
    terms = DraftTerms(
        policy_id="q",
        description="it's: a 'test' # not a comment",
        datasets=("part_defects",),
        members=("supplier-a",),
        purposes=("quality:benchmarking", "no"),
        valid_from=dt.date(2026, 1, 1),
        valid_until=dt.date(2027, 1, 1),
        columns=("plant", "defects"),
        masks={"supplier": "null"},
    )
    path = tmp_path / "draft.yaml"
    path.write_text(draft_text(terms))
    assert lint_files([path], _home()) == []
    policy = parse_policy(path)
    assert policy.description == terms.description
    assert policy.purposes == terms.purposes
    assert policy.shaping.masks == (("supplier", "null"),)
