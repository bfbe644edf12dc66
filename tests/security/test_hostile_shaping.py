"""Hostile SQL against shaped grants: masks, row filters, aggregate-only. Every attack runs
through the server's Provider in process, a spread sample of each table over mutual TLS.

supplier-a may read part_defects with part_no hashed, supplier_price redacted and only the
rows of two plants in one quarter; supplier-b may read it only in aggregates over groups of
at least 8 rows. Each attack names the property it tests. For every one the server refuses
or answers only what the policy allows, stays up, and the next legitimate query works.
The mask and filter attacks run a second time with the guard switched off: the shaped copy
and the plan check alone hold (the aggregate-only plan check alone is shown without any
guard in tests/unit/test_shaped_sandbox.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from connector.client import Peer
from connector.errors import ConnectorError, QueryRejected
from connector.server import RunningServer
from connector.sqlguard import QueryShape
from tests.conftest import Member
from tests.in_process import InProcessPeer
from tests.integration.test_shaped_answers import (
    BENCH,
    MIN_GROUP,
    VIEW,
    ShapedSpace,
    build_shaped,
    source_rows,
    visible_to_a,
)
from tests.security.test_hostile_sql import ALL_ATTACKS, REFUSED, _no_guard, over_the_wire

VISIBLE = sum(1 for r in source_rows() if visible_to_a(r))
# Strings that appear only in what supplier-a must never see: clear part numbers, the
# filtered-out plants, and clear prices (all end in .5; redacted prices are text).
LEAKS = ("P-1", "Leipzig", "Munich", ".5,", ".5}", ".5)")

# (property tested, attack, expected n when the attack is answered; None: refused, or
# answered with nothing the policy withholds)
MASK_AND_FILTER: list[tuple[str, str, int | None]] = [
    ("a CTE reaches only the hash", "WITH c AS (SELECT part_no FROM part_defects) "
     "SELECT count(*) AS n FROM c WHERE part_no = 'P-1000'", 0),
    ("a nested CTE reaches only the hash", "WITH a AS (SELECT * FROM part_defects), "
     "b AS (SELECT part_no FROM a) SELECT count(*) AS n FROM b WHERE part_no LIKE 'P-10%'", 0),
    ("a derived table reaches only the hash", "SELECT count(*) AS n FROM (SELECT part_no AS x "
     "FROM part_defects) WHERE x IN ('P-1000', 'P-1001')", 0),
    ("a scalar subquery reaches only the hash", "SELECT count(*) AS n FROM part_defects WHERE "
     "(SELECT min(part_no) FROM part_defects) = 'P-1000'", 0),
    ("EXISTS sees no filtered row", "SELECT count(*) AS n FROM part_defects WHERE EXISTS "
     "(SELECT 1 FROM part_defects WHERE plant = 'Leipzig')", 0),
    ("IN sees no filtered row", "SELECT count(*) AS n FROM part_defects WHERE plant IN "
     "(SELECT plant FROM part_defects WHERE week < DATE '2026-02-01')", 0),
    ("a correlated subquery sees no filtered row", "SELECT count(*) AS n FROM part_defects d "
     "WHERE (SELECT count(*) FROM part_defects e WHERE e.plant = 'Munich') > 0", 0),
    ("count(*) counts only visible rows", "SELECT count(*) AS n FROM part_defects", VISIBLE),
    ("an aggregate over everything sees only visible rows", "SELECT count(DISTINCT plant) AS n "
     "FROM part_defects", 2),
    ("a window over filtered rows counts only visible rows", "SELECT max(c) AS n FROM "
     "(SELECT count(*) OVER () AS c FROM part_defects)", VISIBLE),
    ("row_number over filtered rows numbers only visible rows", "SELECT max(r) AS n FROM "
     "(SELECT row_number() OVER (ORDER BY week) AS r FROM part_defects)", VISIBLE),
    ("lag reaches no filtered row", "SELECT count(*) AS n FROM (SELECT lag(plant) OVER "
     "(ORDER BY week) AS p FROM part_defects) WHERE p IN ('Leipzig', 'Munich')", 0),
    ("a frame past the filter sees nothing", "SELECT count(*) AS n FROM (SELECT first_value("
     "week) OVER (ORDER BY week ROWS BETWEEN 1000 PRECEDING AND CURRENT ROW) AS w FROM "
     "part_defects) WHERE w < DATE '2026-03-01'", 0),
    ("UNION with another dataset adds no hidden row", "SELECT count(*) AS n FROM (SELECT "
     "plant FROM part_defects UNION SELECT plant FROM plants) WHERE plant = 'Munich'", 0),
    ("UNION ALL self-join brings back no filtered row", "SELECT count(*) AS n FROM (SELECT "
     "plant FROM part_defects UNION ALL SELECT plant FROM part_defects) WHERE plant = 'Leipzig'",
     0),
    ("a join on the clear value finds nothing", "SELECT count(*) AS n FROM part_defects d JOIN "
     "(SELECT 'P-1000' AS p) x ON d.part_no = x.p", 0),
    ("an outer join shows no filtered row", "SELECT count(*) AS n FROM plants p LEFT JOIN "
     "part_defects d ON d.plant = p.plant WHERE p.plant = 'Leipzig' AND d.plant IS NOT NULL", 0),
    ("GROUP BY the masked column gives hashes", "SELECT part_no FROM part_defects GROUP BY "
     "part_no", None),
    ("ORDER BY the masked column orders hashes", "SELECT part_no FROM part_defects ORDER BY "
     "part_no LIMIT 3", None),
    ("the redacted column holds one fixed text", "SELECT count(DISTINCT supplier_price) AS n "
     "FROM part_defects", 1),
    ("arithmetic on a redacted value fails without echoing it", "SELECT supplier_price * 2 "
     "FROM part_defects", None),
    ("a cast of the redacted value fails without echoing it", "SELECT CAST(supplier_price AS "
     "DOUBLE) FROM part_defects", None),
    ("a cast of the hash fails without echoing a clear value", "SELECT CAST(part_no AS INTEGER) "
     "FROM part_defects", None),
    ("a regex error echoes no value", "SELECT regexp_matches(part_no, '(') FROM part_defects",
     None),
    ("length of the hash is the hash's", "SELECT min(length(part_no)) AS n FROM part_defects",
     64),
    ("min of the masked column is a hash", "SELECT min(part_no) FROM part_defects", None),
    ("a qualified name to the stored table is refused", "SELECT part_no FROM "
     "datasets.part_defects", None),
    ("the memory catalog holds nothing else to read", "SELECT * FROM memory.main.part_defects",
     None),
    ("the view name cannot be bypassed with quotes", 'SELECT count(*) AS n FROM "part_defects" '
     "WHERE plant = 'Munich'", 0),
    ("timing: a filter on the clear value scans only hashes", "SELECT count(*) AS n FROM "
     "part_defects WHERE part_no = 'P-1000' AND length(repeat('x', 1000)) > 0", 0),
]  # fmt: skip

# (property tested, attack) for supplier-b: refused, or answered with no group under K rows.
AGGREGATE_ESCAPES: list[tuple[str, str]] = [
    ("no raw rows", "SELECT * FROM part_defects"),
    ("no raw column", "SELECT defects FROM part_defects"),
    ("no raw rows behind LIMIT", "SELECT plant FROM part_defects LIMIT 1"),
    ("GROUP BY a unique combination drops every group",
     "SELECT plant, defect_code, defects, week, count(*) FROM part_defects "
     "GROUP BY plant, defect_code, defects, week"),
    ("GROUP BY small groups drops them", "SELECT plant, defects, count(*) FROM part_defects "
     "GROUP BY plant, defects"),
    ("HAVING count(*) = 1 returns nothing", "SELECT plant, count(*) FROM part_defects "
     "GROUP BY plant HAVING count(*) = 1"),
    ("HAVING count(*) < K returns nothing", "SELECT week, count(*) FROM part_defects "
     "GROUP BY week HAVING count(*) < 8"),
    ("OR in HAVING cannot lift the minimum", "SELECT week, count(*) FROM part_defects "
     "GROUP BY week HAVING count(*) >= 8 OR true"),
    ("min of a masked key is refused", "SELECT plant, min(part_no) FROM part_defects "
     "GROUP BY plant"),
    ("max of a text column is refused", "SELECT plant, max(defect_code) FROM part_defects "
     "GROUP BY plant"),
    ("string_agg is refused", "SELECT plant, string_agg(defect_code, ',') FROM part_defects "
     "GROUP BY plant"),
    ("list() is refused", "SELECT plant, list(defects) FROM part_defects GROUP BY plant"),
    ("array_agg is refused", "SELECT plant, array_agg(week) FROM part_defects GROUP BY plant"),
    ("arg_max is refused", "SELECT plant, arg_max(part_no, defects) FROM part_defects "
     "GROUP BY plant"),
    ("max_by is refused", "SELECT plant, max_by(week, defects) FROM part_defects GROUP BY plant"),
    ("first() is refused", "SELECT plant, first(part_no) FROM part_defects GROUP BY plant"),
    ("any_value is refused", "SELECT plant, any_value(defects) FROM part_defects GROUP BY plant"),
    ("histogram is refused", "SELECT plant, histogram(defects) FROM part_defects GROUP BY plant"),
    ("mode is refused", "SELECT plant, mode(defects) FROM part_defects GROUP BY plant"),
    ("quantile_disc is refused", "SELECT plant, quantile_disc(defects, 0.5) FROM part_defects "
     "GROUP BY plant"),
    ("a conditional aggregate cannot single out a row",
     "SELECT plant, sum(CASE WHEN week = DATE '2026-01-05' THEN defects END) FROM part_defects "
     "GROUP BY plant"),
    ("FILTER cannot single out a row", "SELECT plant, sum(defects) FILTER (WHERE week = "
     "DATE '2026-01-05') FROM part_defects GROUP BY plant"),
    ("WHERE on a non-grouping column cannot carve a group", "SELECT plant, sum(defects) FROM "
     "part_defects WHERE week = DATE '2026-01-05' GROUP BY plant"),
    ("ROLLUP subtotals are refused", "SELECT plant, defect_code, count(*) FROM part_defects "
     "GROUP BY ROLLUP (plant, defect_code)"),
    ("GROUPING SETS are refused", "SELECT plant, count(*) FROM part_defects "
     "GROUP BY GROUPING SETS ((plant), ())"),
    ("GROUP BY ALL is refused", "SELECT plant, count(*) FROM part_defects GROUP BY ALL"),
    ("a window over raw rows is refused", "SELECT plant, row_number() OVER () FROM part_defects"),
    ("a window over groups is refused", "SELECT plant, sum(count(*)) OVER () FROM part_defects "
     "GROUP BY plant"),
    ("a CTE is refused", "WITH r AS (SELECT * FROM part_defects) SELECT count(*) FROM r"),
    ("a subquery in FROM is refused", "SELECT count(*) FROM (SELECT * FROM part_defects "
     "WHERE defects = 3)"),
    ("a subquery in WHERE is refused", "SELECT plant, count(*) FROM part_defects WHERE plant IN "
     "(SELECT plant FROM part_defects WHERE defects = 3) GROUP BY plant"),
    ("a scalar subquery is refused", "SELECT (SELECT max(defects) FROM part_defects)"),
    ("a join with another dataset is refused", "SELECT city, count(*) FROM part_defects JOIN "
     "plants USING (plant) GROUP BY city"),
    ("a self-join is refused", "SELECT a.plant, count(*) FROM part_defects a JOIN part_defects b "
     "ON a.week = b.week GROUP BY a.plant"),
    ("UNION with raw rows is refused", "SELECT plant, count(*) FROM part_defects GROUP BY plant "
     "UNION ALL SELECT plant, defects FROM part_defects"),
    ("ORDER BY a conditional aggregate is refused", "SELECT plant, count(*) FROM part_defects "
     "GROUP BY plant ORDER BY sum(CASE WHEN week = DATE '2026-01-05' THEN defects END)"),
    ("HAVING on a conditional aggregate is refused", "SELECT plant, count(*) FROM part_defects "
     "GROUP BY plant HAVING sum(CASE WHEN week = DATE '2026-01-05' THEN defects END) > 3"),
    ("an aggregate of an expression is refused", "SELECT plant, sum(defects * (week = DATE "
     "'2026-01-05')::INT) FROM part_defects GROUP BY plant"),
    ("DISTINCT ON a conditional aggregate is refused", "SELECT DISTINCT ON (sum(CASE WHEN week "
     "= DATE '2026-01-05' THEN defects END)) plant, count(*) FROM part_defects GROUP BY plant"),
    ("QUALIFY is refused", "SELECT plant, count(*) FROM part_defects GROUP BY plant "
     "QUALIFY row_number() OVER () = 1"),
    ("GROUP BY an expression is refused", "SELECT defects % 19, count(*) FROM part_defects "
     "GROUP BY defects % 19"),
]  # fmt: skip

SHAPING_ATTACKS = len(MASK_AND_FILTER) + len(AGGREGATE_ESCAPES)


WIRE_MASK_AND_FILTER = over_the_wire(MASK_AND_FILTER, 12)
WIRE_AGGREGATE_ESCAPES = over_the_wire(AGGREGATE_ESCAPES, 12)


def _answered_without_leak(table: pa.Table, prop: str, expected: int | None) -> None:
    text = str(table.to_pylist())
    for leak in LEAKS:
        assert leak not in text, f"{prop}: the answer holds {leak!r}: {text[:300]}"
    if expected is not None:
        assert table.column("n")[0].as_py() == expected, prop


def _mask_and_filter_attack(
    peer: Peer | InProcessPeer, prop: str, sql: str, expected: int | None, *, guarded: bool
) -> None:
    try:
        table = peer.query(sql, VIEW)
    except ConnectorError as refused:
        assert isinstance(refused, REFUSED), f"{prop}: {refused!r}"
        # Without the guard, a query over a dataset the test guard does not report is
        # refused by the sandbox: safe, though the guarded server answers it.
        assert expected is None or not guarded, f"{prop}: refused, not answered: {refused}"
        for leak in LEAKS:
            assert leak not in str(refused), f"{prop}: the refusal leaks {leak!r}"
    else:
        _answered_without_leak(table, prop, expected)
    assert peer.query("SELECT count(*) AS n FROM part_defects", VIEW)["n"][0].as_py() == VISIBLE


@pytest.fixture(scope="module")
def shared_shaped(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> ShapedSpace:
    """One shaped space for the module: the attacks only query it."""
    return build_shaped(module_dir / "shaped", dataspace, module_serve)


@pytest.fixture(scope="module")
def a_in_process(shared_shaped: ShapedSpace) -> InProcessPeer:
    """supplier-a asking the module server's Provider: made once for every attack."""
    return shared_shaped.in_process(shared_shaped.supplier_a)


@pytest.fixture(scope="module")
def b_in_process(shared_shaped: ShapedSpace) -> InProcessPeer:
    """supplier-b asking the module server's Provider: made once for every attack."""
    return shared_shaped.in_process(shared_shaped.supplier_b)


@pytest.fixture(scope="module")
def a_over_mtls(shared_shaped: ShapedSpace) -> Iterator[Peer]:
    """supplier-a's one mTLS channel to the module server: each attack's check that the
    next query is answered runs on the channel it came by."""
    with shared_shaped.peer(shared_shaped.supplier_a) as peer:
        yield peer


@pytest.fixture(scope="module")
def b_over_mtls(shared_shaped: ShapedSpace) -> Iterator[Peer]:
    """supplier-b's one mTLS channel to the module server (as a_over_mtls)."""
    with shared_shaped.peer(shared_shaped.supplier_b) as peer:
        yield peer


@pytest.fixture
def shaped_unguarded(shared_shaped: ShapedSpace) -> Iterator[ShapedSpace]:
    """The module's server with its guard switched off for one test (a test build)."""
    provider = shared_shaped.server.provider
    original: Callable[[str], QueryShape] = provider.guard
    provider.guard = _no_guard
    yield shared_shaped
    provider.guard = original


@pytest.mark.parametrize(
    ("prop", "sql", "expected"), MASK_AND_FILTER, ids=[p for p, _, _ in MASK_AND_FILTER]
)
def test_masks_and_row_filters_hold_against_attacks(
    a_in_process: InProcessPeer, prop: str, sql: str, expected: int | None
) -> None:
    _mask_and_filter_attack(a_in_process, prop, sql, expected, guarded=True)


@pytest.mark.parametrize(
    ("prop", "sql", "expected"), WIRE_MASK_AND_FILTER, ids=[p for p, _, _ in WIRE_MASK_AND_FILTER]
)
def test_masks_and_row_filters_hold_against_attacks_over_mtls(
    a_over_mtls: Peer, prop: str, sql: str, expected: int | None
) -> None:
    _mask_and_filter_attack(a_over_mtls, prop, sql, expected, guarded=True)


@pytest.mark.parametrize(
    ("prop", "sql", "expected"), MASK_AND_FILTER, ids=[p for p, _, _ in MASK_AND_FILTER]
)
def test_masks_and_row_filters_hold_with_the_guard_off(
    shaped_unguarded: ShapedSpace,
    a_in_process: InProcessPeer,
    prop: str,
    sql: str,
    expected: int | None,
) -> None:
    _mask_and_filter_attack(a_in_process, prop, sql, expected, guarded=False)


@pytest.mark.parametrize(
    ("prop", "sql", "expected"), WIRE_MASK_AND_FILTER, ids=[p for p, _, _ in WIRE_MASK_AND_FILTER]
)
def test_masks_and_row_filters_hold_with_the_guard_off_over_mtls(
    shaped_unguarded: ShapedSpace, a_over_mtls: Peer, prop: str, sql: str, expected: int | None
) -> None:
    _mask_and_filter_attack(a_over_mtls, prop, sql, expected, guarded=False)


def _aggregate_escape(peer: Peer | InProcessPeer, prop: str, sql: str) -> None:
    try:
        table = peer.query(sql, BENCH)
    except QueryRejected as refused:
        assert "aggregate-only" in str(refused), f"{prop}: {refused}"
    else:
        # Answered in the aggregate form: only groups of at least K rows, none here.
        assert table.num_rows == 0, f"{prop}: {table.to_pylist()[:3]}"
    total = peer.query("SELECT count(*) AS n FROM part_defects", BENCH)["n"][0].as_py()
    assert total == len(source_rows()) >= MIN_GROUP


@pytest.mark.parametrize(("prop", "sql"), AGGREGATE_ESCAPES, ids=[p for p, _ in AGGREGATE_ESCAPES])
def test_aggregate_only_escapes_get_no_row_and_no_small_group(
    b_in_process: InProcessPeer, prop: str, sql: str
) -> None:
    _aggregate_escape(b_in_process, prop, sql)


@pytest.mark.parametrize(
    ("prop", "sql"), WIRE_AGGREGATE_ESCAPES, ids=[p for p, _ in WIRE_AGGREGATE_ESCAPES]
)
def test_aggregate_only_escapes_get_no_row_and_no_small_group_over_mtls(
    b_over_mtls: Peer, prop: str, sql: str
) -> None:
    _aggregate_escape(b_over_mtls, prop, sql)


def test_the_whole_suite_has_at_least_150_attacks() -> None:
    assert len(ALL_ATTACKS) + SHAPING_ATTACKS >= 150
    every = [sql for _, sql in ALL_ATTACKS + AGGREGATE_ESCAPES] + [s for _, s, _ in MASK_AND_FILTER]
    assert len(set(every)) == len(every)
