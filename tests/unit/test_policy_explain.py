"""policy explain: every term of a policy in words a legal team holds against the contract."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from connector.policy.explain import explanation, explanation_lines, filter_words
from connector.policy.model import UsagePolicy, parse_policy
from connector.shaping import RowFilter
from connector.store import ColumnInfo, DatasetInfo

FULL = """\
id: voltcell-quality
version: 3
description: Defect figures for Voltcell's quality benchmarking
datasets: [part_defects]
grantees: {members: [voltcell, cellco]}
purposes: [quality-benchmarking]
valid: {from: 2026-01-01, until: 2030-06-30T12:00:00+02:00}
columns:
  allow: [plant, week, defects]
  mask: {supplier: hash, part_no: redact, price: null}
rows:
  where: {plant: [Regensburg, Leipzig], week: {gte: 10, lt: 40}}
aggregate_only:
  min_group_size: 20
  group_by: [[plant], [plant, week]]
  noise: {epsilon: 0.5, epsilon_per_day: 5, bounds: {defects: [0, 100]}}
limits: {max_rows_per_query: 1000, queries_per_day: 50}
obligations:
  delete_within_days: 90
  attribution: "Source: Northwind Motors"
  terms: [no resale]
"""
PLAIN = """\
id: axle
version: 1
description: All defects
datasets: [part_defects]
grantees: {members: [axle-works]}
purposes: [a, b]
valid: {from: 2026-01-01, until: 2030-01-01}
columns: {allow: [plant]}
"""


def parsed(text: str) -> UsagePolicy:
    return parse_policy(Path("p.yaml"), text.encode())


def test_explain_names_who_what_purpose_and_until_when() -> None:
    text = "\n".join(explanation_lines(parsed(FULL)))
    assert "Who: only member(s) voltcell, cellco" in text
    assert "Purposes: only for quality-benchmarking" in text
    assert "Datasets: part_defects" in text
    assert "from 2026-01-01 00:00 UTC until 2030-06-30T10:00:00+00:00" in text
    assert "Columns in the clear: plant, week, defects" in text


def test_explain_says_how_each_column_is_masked() -> None:
    lines = explanation_lines(parsed(FULL))
    assert any(line.startswith("  supplier: replaced by a keyed hash") for line in lines)
    assert any(
        line.startswith("  part_no: every value replaced by the word REDACTED") for line in lines
    )
    assert any(line.startswith("  price: every value replaced by NULL") for line in lines)


def test_explain_rows_aggregates_noise_limits_and_obligations() -> None:
    text = "\n".join(explanation_lines(parsed(FULL)))
    assert (
        "Rows: only rows where plant is one of Regensburg, Leipzig; and week is at least 10 and "
        "less than 40" in text
    )
    assert "only aggregates over groups of at least 20 rows" in text
    assert "Grouping: only by (plant); (plant, week)" in text
    assert "epsilon 0.5 a query, 5 a day per member; sums clamped to defects in [0, 100]" in text
    assert "Limits: at most 1000 rows in one answer; at most 50 queries a day" in text
    assert "delete received data within 90 days" in text
    assert "attribute as: Source: Northwind Motors" in text
    assert "term: no resale" in text


def test_explain_says_plainly_what_a_policy_does_not_restrict() -> None:
    lines = explanation_lines(parsed(PLAIN))
    for line in (
        "Columns masked: none",
        "Rows: every row",
        "Aggregate-only: no; single rows may be received",
        "Limits: none",
        "Obligations: none",
    ):
        assert line in lines


def test_explain_with_the_homes_datasets_names_the_columns_withheld() -> None:
    info = DatasetInfo(
        "part_defects",
        "",
        10,
        tuple(ColumnInfo(n, "VARCHAR") for n in ("plant", "supplier", "secret_price")),
        dt.datetime.now(dt.UTC),
    )
    policy = parsed(PLAIN)
    assert "Columns of part_defects not shared: supplier, secret_price" in explanation_lines(
        policy, {"part_defects": info}
    )
    assert explanation(policy, {"part_defects": info})["columns_withheld"] == {
        "part_defects": ["supplier", "secret_price"]
    }


def test_explanation_as_json_holds_every_term() -> None:
    explained = explanation(parsed(FULL))
    json.dumps(explained)  # JSON-able as it is
    assert explained["members"] == ["voltcell", "cellco"]
    assert explained["valid_until"] == "2030-06-30T10:00:00+00:00"
    assert explained["columns_masked"][0] == {
        "column": "supplier",
        "mask": "hash",
        "shown_as": "hmac_sha256(<connector mask key>, supplier) AS supplier",
    }
    assert explained["rows"] == [
        "plant is one of Regensburg, Leipzig",
        "week is at least 10 and less than 40",
    ]
    assert explained["min_group_size"] == 20 and explained["aggregate_only"] is True
    assert explained["noise"]["epsilon"] == 0.5
    assert explained["limits"] == {"max_rows_per_query": 1000, "queries_per_day": 50}
    assert explained["obligations"]["terms"] == ["no resale"]
    assert "columns_withheld" not in explained


def test_filter_words_spell_values_as_in_the_file() -> None:
    assert filter_words(RowFilter("ok", values=(True, 1))) == "ok is one of true, 1"
    day = RowFilter("day", bounds=(("gt", dt.date(2026, 1, 2)),))
    assert filter_words(day) == "day is more than 2026-01-02"
