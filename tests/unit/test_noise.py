"""Noise and declared grouping sets: the policy terms, the query form, the noise, the budget."""

from __future__ import annotations

import datetime as dt
import statistics
import threading
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from connector.enforce import Relation, relation_for
from connector.errors import PolicyError, QueryRejected, ResourceExhausted
from connector.noise import charges, noise_plan
from connector.policy.model import parse_policy
from connector.quota import QuotaLedger
from connector.shaping import Noise, Shaping
from connector.store import ColumnInfo, DatasetInfo
from tests.conftest import Member, run_cli

POLICY = """\
id: noisy
version: 1
description: Noisy benchmark
datasets: [part_defects]
grantees: {members: [acme]}
purposes: [benchmark]
valid: {from: 2026-01-01, until: 2027-01-01}
columns:
  allow: [plant, week, defects, price]
  mask: {part_no: hash}
aggregate_only:
  min_group_size: 3
"""
NOISE = (
    "  noise: {epsilon: 0.5, epsilon_per_day: 2, bounds: {defects: [0, 100], price: [-1.5, 2.5]}}\n"
)
NOW = dt.datetime(2026, 11, 25, 15, 30, tzinfo=dt.UTC)


def _parse(tmp_path: Path, extra: str) -> Shaping:
    path = tmp_path / "p.yaml"
    path.write_text(POLICY + extra)
    return parse_policy(path).shaping


def test_noise_and_grouping_sets_are_read(tmp_path: Path) -> None:
    shaping = _parse(tmp_path, NOISE + "  group_by: [[plant], [Plant, week], [part_no]]\n")
    assert shaping.noise == Noise(0.5, 2.0, (("defects", 0, 100), ("price", -1.5, 2.5)))
    assert shaping.group_by == (("plant",), ("plant", "week"), ("part_no",))
    text = shaping.canonical()
    assert '"epsilon":0.5' in text and '"group_by":[["part_no"],["plant"],["plant","week"]]' in text
    # Without the new terms the canonical text is what it always was.
    assert "noise" not in _parse(tmp_path, "").canonical()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("  noise: {epsilon: 0, epsilon_per_day: 1}\n", "greater than 0"),
        ("  noise: {epsilon: 11, epsilon_per_day: 20}\n", "at most 10"),
        ("  noise: {epsilon: .nan, epsilon_per_day: 1}\n", "finite"),
        ("  noise: {epsilon: true, epsilon_per_day: 1}\n", "a number"),
        ("  noise: {epsilon: 1, epsilon_per_day: 0.5}\n", "at least epsilon"),
        ("  noise: {epsilon: 1}\n", "needs epsilon_per_day"),
        ("  noise: {epsilon: 1, epsilon_per_day: 1, delta: 0}\n", "unknown key 'delta'"),
        ("  noise: {epsilon: 1, epsilon_per_day: 1, bounds: {defects: [5, 5]}}\n", "low < high"),
        ("  noise: {epsilon: 1, epsilon_per_day: 1, bounds: {defects: [0]}}\n", "[low, high]"),
        ("  noise: {epsilon: 1, epsilon_per_day: 1, bounds: {defects: [0, .inf]}}\n", "finite"),
        ("  noise: {epsilon: 1, epsilon_per_day: 1, bounds: {defects: [a, b]}}\n", "numbers"),
        ("  noise: {epsilon: 1, epsilon_per_day: 1, bounds: {part_no: [0, 1]}}\n", "not masked"),
        ("  noise: {epsilon: 1, epsilon_per_day: 1, bounds: {secret: [0, 1]}}\n", "columns.allow"),
        ("  group_by: []\n", "non-empty list"),
        ("  group_by: [[]]\n", "non-empty list"),
        ("  group_by: [plant]\n", "non-empty list"),
        ("  group_by: [[plant, plant]]\n", "twice"),
        ("  group_by: [[plant, week], [week, plant]]\n", "twice"),
        ("  group_by: [[plant, secret]]\n", "does not grant"),
    ],
)
def test_bad_terms_are_refused_with_the_line_and_the_fix(
    tmp_path: Path, extra: str, message: str
) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace(".", r"\.")) as error:
        _parse(tmp_path, extra)
    assert error.value.line is not None and error.value.line >= 12


INFO = DatasetInfo(
    "part_defects",
    "",
    0,
    (
        ColumnInfo("plant", "VARCHAR"),
        ColumnInfo("week", "DATE"),
        ColumnInfo("defects", "BIGINT"),
        ColumnInfo("price", "DECIMAL(9,2)"),
    ),
    NOW,
)


def _relation(shaping: Shaping) -> Relation:
    return relation_for(INFO, {"plant", "week", "defects", "price"}, shaping, b"k" * 32)


def test_the_shaped_copy_clamps_bounded_columns(tmp_path: Path) -> None:
    relation = _relation(_parse(tmp_path, NOISE))
    sql = relation.sql
    assert 'greatest(0, least(100, "defects")) END AS BIGINT) AS "defects"' in sql
    assert 'greatest(-1.5, least(2.5, "price")) END AS DOUBLE) AS "price"' in sql
    assert dict((c.name, c.type) for c in relation.columns)["price"] == "DOUBLE"


def test_integer_columns_clamp_inside_fractional_bounds(tmp_path: Path) -> None:
    shaping = _parse(tmp_path, NOISE.replace("[0, 100]", "[-0.5, 99.5]"))
    relation = _relation(shaping)
    assert relation.clamps["defects"] == (0, 99)


def test_the_measurements_query_and_the_answer(tmp_path: Path) -> None:
    relation = _relation(_parse(tmp_path, NOISE))
    plan = noise_plan(
        "SELECT avg(defects) AS a, plant, sum(defects), count(*) AS n FROM part_defects "
        "WHERE plant = 'x' GROUP BY plant ORDER BY plant LIMIT 2",
        relation,
    )
    assert plan is not None
    assert [m.text for m in plan.measurements] == ["sum(defects)", "count(defects)", "count(*)"]
    assert plan.epsilon_each == pytest.approx(0.5 / 3)
    assert "GROUP BY plant" in plan.sql and "LIMIT 2" in plan.sql and "max" not in plan.sql
    measured = pa.record_batch(
        {
            "g-0": ["x"] * 2000,
            "m-0": pa.array([5000] * 2000, pa.int64()),
            "m-1": pa.array([100] * 2000, pa.int64()),
            "m-2": pa.array([100] * 2000, pa.int64()),
        }
    )
    answer = plan.apply(measured)
    assert answer.schema.names == ["a", "plant", "sum(defects)", "n"]
    assert answer.schema.types == [pa.float64(), pa.string(), pa.int64(), pa.int64()]
    sums = answer.column("sum(defects)").to_pylist()
    # Scale 100 / (0.5 / 3) = 600: the mean of 2000 draws lies within 5000 +- 150 (> 10 sigma).
    assert abs(statistics.mean(sums) - 5000) < 150
    assert statistics.pstdev(sums) > 300
    assert sum(s == 5000 for s in sums) < 50


def test_fractional_sums_get_laplace_noise_over_doubles(tmp_path: Path) -> None:
    relation = _relation(_parse(tmp_path, NOISE))
    plan = noise_plan("SELECT sum(price) AS p FROM part_defects", relation)
    assert plan is not None
    (measurement,) = plan.measurements
    assert (measurement.integer, measurement.sensitivity) == (False, 2.5)
    answer = plan.apply(pa.record_batch({"m-0": pa.array([10.0, None], pa.float64())}))
    assert answer.schema.types == [pa.float64()]
    assert None not in answer.column("p").to_pylist()  # a sum over nothing is noised 0


def test_declared_sets_refuse_other_groupings(tmp_path: Path) -> None:
    relation = _relation(_parse(tmp_path, "  group_by: [[plant, week]]\n"))
    sql = "SELECT week, plant, max(defects) FROM part_defects GROUP BY week, plant"
    assert noise_plan(sql, relation) is None
    with pytest.raises(QueryRejected, match="not a grouping the owner declared"):
        noise_plan("SELECT plant, count(*) FROM part_defects GROUP BY plant", relation)


def test_the_budget_is_exact_under_concurrency_and_durable(tmp_path: Path) -> None:
    ledger = QuotaLedger(tmp_path / "q.sqlite")
    charge = charges(Noise(0.1, 1.0), ["noisy"])  # ten queries a day, if exactly counted
    granted: list[bool] = []

    def claim() -> None:
        try:
            ledger.claim_privacy("acme", charge, NOW)
            granted.append(True)
        except ResourceExhausted:
            granted.append(False)

    threads = [threading.Thread(target=claim) for _ in range(25)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert granted.count(True) == 10
    ledger.close()
    reopened = QuotaLedger(tmp_path / "q.sqlite")
    with pytest.raises(ResourceExhausted, match=r"privacy budget.*resets at 2026-11-26T00:00"):
        reopened.claim_privacy("acme", charge, NOW)
    reopened.claim_privacy("other", charge, NOW)
    reopened.claim_privacy("acme", charge, NOW + dt.timedelta(days=1))
    assert reopened.privacy_spent("acme", "noisy", NOW)[0] == 1_000_000
    reopened.close()


def test_verify_warns_when_declared_sets_can_be_differenced(
    make_member: Callable[[str], Member], capsys: pytest.CaptureFixture[str]
) -> None:
    owner = make_member("carmaker")
    text = POLICY.replace("price]", "price, defect_code]")
    owner.write_policy("nested.yaml", text + "  group_by: [[plant], [plant, week]]\n")
    owner.write_policy("one.yaml", text.replace("noisy", "one") + "  group_by: [[plant, week]]\n")
    owner.write_policy(
        "noisy.yaml",
        text.replace("id: noisy", "id: n2") + NOISE + ("  group_by: [[plant], [plant, week]]\n"),
    )
    capsys.readouterr()
    assert run_cli("policy", "verify", "--home", owner.home) == 0
    lines = capsys.readouterr().out.splitlines()
    by_file: dict[str, list[str]] = {}
    for line in lines:
        if not line.startswith(" "):
            current = line.split(":")[0].rsplit("/", 1)[-1]
        by_file.setdefault(current, []).append(line)
    assert any("WARNING" in x and "nest" in x for x in by_file["nested.yaml"])
    # (This home holds no data: the datasets are reported missing, which is another warning.)
    assert not any("WARNING" in x and "grouping sets" in x for x in by_file["one.yaml"])
    assert not any("WARNING" in x and "grouping sets" in x for x in by_file["noisy.yaml"])
    assert any("epsilon 0.5 a query" in x for x in by_file["noisy.yaml"])
