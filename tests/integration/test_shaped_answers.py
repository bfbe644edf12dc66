"""Policies shape the answer over mutual TLS: masks, row filters, aggregate-only, precedence.

One provider, two grantees: supplier-a sees part_defects masked and filtered, supplier-b
only in aggregates over groups of at least 5 rows. Expected figures are computed here from
the same rows the provider ingested (tests/conftest.py: write_defects_csv).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from connector.client import Peer
from connector.errors import PermissionDenied, QueryRejected
from connector.server import RunningServer
from tests.conftest import (
    Member,
    connect,
    from_template,
    in_process_peer,
    policy_text,
    write_defects_csv,
)
from tests.in_process import InProcessPeer

VIEW = "plant-view"
BENCH = "benchmark"
MIN_GROUP = 8  # (plant, defect_code) has groups of 7 and of 8 rows
PLANTS = ["Regensburg", "Dingolfing", "Leipzig", "Munich"]
ROWS = 200

MASKED_POLICY = policy_text(
    "masked-view",
    members="[supplier-a]",
    datasets="[part_defects]",
    purposes=f"[{VIEW}]",
    columns="[plant, defect_code, defects, week]",
) + (
    "  mask: {part_no: hash, supplier_price: redact}\n"
    "rows:\n"
    "  where:\n"
    "    plant: [Regensburg, Dingolfing]\n"
    "    week: {gte: 2026-03-01, lt: 2026-06-01}\n"
)
AGGREGATE_POLICY = policy_text(
    "benchmark",
    members="[supplier-b]",
    datasets="[part_defects]",
    purposes=f"[{BENCH}]",
    columns="[plant, defect_code, defects, week]",
) + (f"  mask: {{part_no: hash}}\naggregate_only: {{min_group_size: {MIN_GROUP}}}\n")
PLANTS_POLICY = policy_text(
    "plants",
    members="[supplier-a, supplier-b]",
    datasets="[plants]",
    purposes=f"[{VIEW}, {BENCH}]",
    columns="[plant, city]",
)


def source_rows() -> list[dict[str, object]]:
    """The rows write_defects_csv writes, as Python values."""
    return [
        {
            "plant": PLANTS[i % 4],
            "part_no": f"P-{1000 + i % 25}",
            "defect_code": f"D{i % 7}",
            "defects": (i * 37) % 19,
            "week": dt.date(2026, 1, 5) + dt.timedelta(weeks=i % 40),
        }
        for i in range(ROWS)
    ]


def visible_to_a(row: dict[str, object]) -> bool:
    week = row["week"]
    assert isinstance(week, dt.date)
    in_range = dt.date(2026, 3, 1) <= week < dt.date(2026, 6, 1)
    return row["plant"] in ("Regensburg", "Dingolfing") and in_range


@dataclass
class ShapedSpace:
    provider: Member
    supplier_a: Member
    supplier_b: Member
    server: RunningServer
    mask_key: bytes

    def peer(self, member: Member) -> Peer:
        return connect(self.server, member, timeout=60)

    def in_process(self, member: Member) -> InProcessPeer:
        """member asking the server's Provider directly (no TLS, no gRPC): for long tables."""
        return in_process_peer(self.server, member)

    def hashed(self, text: str) -> str:
        return hmac.new(self.mask_key, text.encode(), hashlib.sha256).hexdigest()


def shaped_homes(directory: Path, make: Callable[[str], Member]) -> list[Member]:
    """carmaker with part_defects and plants, shaped for supplier-a and supplier-b."""
    provider = make("carmaker")
    supplier_a, supplier_b = make("supplier-a"), make("supplier-b")
    provider.ingest(write_defects_csv(directory / "d.csv"), "part_defects", "Weekly defects")
    plants = directory / "plants.csv"
    plants.write_text("plant,city\nRegensburg,Regensburg\nDingolfing,Dingolfing\nLeipzig,Leipzig\n")
    provider.ingest(plants, "plants", "Plants")
    provider.write_policy("masked.yaml", MASKED_POLICY)
    provider.write_policy("benchmark.yaml", AGGREGATE_POLICY)
    provider.write_policy("plants.yaml", PLANTS_POLICY)
    return [provider, supplier_a, supplier_b]


def build_shaped(
    directory: Path, dataspace: Path, serve: Callable[[Member], RunningServer]
) -> ShapedSpace:
    """The shaped space, from a copy of its homes made once per session."""
    provider, supplier_a, supplier_b = from_template(directory, dataspace, "shaped", shaped_homes)
    key = bytes.fromhex((provider.home / "keys" / "mask.key").read_text().strip())
    return ShapedSpace(provider, supplier_a, supplier_b, serve(provider), key)


@pytest.fixture
def shaped(
    tmp_path: Path, dataspace: Path, serve: Callable[[Member], RunningServer]
) -> ShapedSpace:
    """A shaped space of this test's own: for tests that change its policies."""
    return build_shaped(tmp_path, dataspace, serve)


@pytest.fixture(scope="module")
def shared_shaped(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> ShapedSpace:
    """One shaped space for the tests of a module that only query it."""
    return build_shaped(module_dir / "shaped", dataspace, module_serve)


def test_catalog_marks_masked_columns_row_filter_and_aggregate_only(
    shared_shaped: ShapedSpace,
) -> None:
    with shared_shaped.peer(shared_shaped.supplier_a) as peer:
        (defects, _) = peer.catalog()
    assert defects.masks == {"part_no": "hash", "supplier_price": "redact"}
    assert dict(defects.columns)["part_no"] == "VARCHAR"
    assert defects.row_filter == (
        "(\"plant\" IN ('Regensburg', 'Dingolfing')) AND "
        "(\"week\" >= DATE '2026-03-01' AND \"week\" < DATE '2026-06-01')"
    )
    assert defects.min_group_size == 0
    with shared_shaped.peer(shared_shaped.supplier_b) as peer:
        catalog = {d.name: d for d in peer.catalog()}
    assert catalog["part_defects"].min_group_size == MIN_GROUP
    assert catalog["plants"].min_group_size == 0


def test_masked_and_filtered_rows_are_all_a_peer_gets(shared_shaped: ShapedSpace) -> None:
    expected = [r for r in source_rows() if visible_to_a(r)]
    with shared_shaped.peer(shared_shaped.supplier_a) as peer:
        table = peer.query("SELECT * FROM part_defects", VIEW)
    rows = table.to_pylist()
    assert len(rows) == len(expected) > 0
    assert table.column_names == [
        "plant", "part_no", "defect_code", "defects", "week", "supplier_price",
    ]  # fmt: skip
    assert {r["supplier_price"] for r in rows} == {"REDACTED"}
    assert Counter(r["part_no"] for r in rows) == Counter(
        shared_shaped.hashed(str(r["part_no"])) for r in expected
    )
    assert {r["plant"] for r in rows} == {"Regensburg", "Dingolfing"}


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        # The clear value is in no row: filters, groups, joins and sorts see only hashes.
        ("SELECT count(*) AS n FROM part_defects WHERE part_no = 'P-1000'", 0),
        ("SELECT count(*) AS n FROM part_defects WHERE part_no LIKE 'P-%'", 0),
        ("SELECT count(*) AS n FROM part_defects WHERE supplier_price <> 'REDACTED'", 0),
        ("SELECT count(*) AS n FROM part_defects WHERE plant IN ('Leipzig', 'Munich')", 0),
        ("SELECT count(*) AS n FROM part_defects WHERE week < DATE '2026-03-01'", 0),
        (
            "SELECT count(*) AS n FROM part_defects d WHERE EXISTS "
            "(SELECT 1 FROM part_defects e WHERE e.plant = 'Leipzig')",
            0,
        ),
        (
            "SELECT count(*) AS n FROM (SELECT plant, row_number() OVER () AS r "
            "FROM part_defects) WHERE plant = 'Munich'",
            0,
        ),
        (
            "SELECT count(*) AS n FROM plants p LEFT JOIN part_defects d USING (plant) "
            "WHERE d.plant IS NOT NULL AND p.plant = 'Leipzig'",
            0,
        ),
    ],
)
def test_no_clear_value_and_no_filtered_row_is_reachable(
    shared_shaped: ShapedSpace, sql: str, expected: int
) -> None:
    with shared_shaped.peer(shared_shaped.supplier_a) as peer:
        assert peer.query(sql, VIEW)["n"][0].as_py() == expected


def test_hashed_columns_still_join_and_count(shared_shaped: ShapedSpace) -> None:
    expected = [r for r in source_rows() if visible_to_a(r)]
    by_part = Counter(shared_shaped.hashed(str(r["part_no"])) for r in expected)
    sql = "SELECT part_no, count(*) AS n FROM part_defects GROUP BY part_no ORDER BY part_no"
    with shared_shaped.peer(shared_shaped.supplier_a) as peer:
        rows = peer.query(sql, VIEW).to_pylist()
        pairs = peer.query(
            "SELECT count(*) AS n FROM part_defects a JOIN part_defects b ON a.part_no = b.part_no",
            VIEW,
        )
        cities = peer.query(
            "SELECT city, count(*) AS n FROM part_defects JOIN plants USING (plant) "
            "GROUP BY city ORDER BY city",
            VIEW,
        ).to_pylist()
    assert {r["part_no"]: r["n"] for r in rows} == dict(by_part)
    assert pairs["n"][0].as_py() == sum(n * n for n in by_part.values())
    assert cities == [
        {"city": c, "n": sum(1 for r in expected if r["plant"] == c)}
        for c in ("Dingolfing", "Regensburg")
    ]


def test_explain_shows_masks_filters_and_never_the_key(shared_shaped: ShapedSpace) -> None:
    with shared_shaped.peer(shared_shaped.supplier_a) as peer:
        decision = peer.explain("SELECT part_no FROM part_defects", VIEW)
    assert decision.allow
    (relation,) = decision.relations
    assert relation.masks == {"part_no": "hash", "supplier_price": "redact"}
    assert "hmac_sha256(<connector mask key>, part_no) AS part_no" in relation.definition
    assert "'REDACTED' AS supplier_price" in relation.definition
    assert relation.row_filter in relation.definition
    assert relation.min_group_size == 0
    assert shared_shaped.mask_key.hex()[:12] not in relation.definition
    assert decision.query == "SELECT part_no FROM part_defects"


def aggregate_groups(keys: tuple[str, ...]) -> dict[tuple[object, ...], list[int]]:
    groups: dict[tuple[object, ...], list[int]] = defaultdict(list)
    for row in source_rows():
        value = row["defects"]
        assert isinstance(value, int)
        groups[tuple(row[k] for k in keys)].append(value)
    return groups


def test_aggregate_only_returns_only_groups_of_at_least_k_rows(shared_shaped: ShapedSpace) -> None:
    sql = (
        "SELECT plant, defect_code, count(*) AS n, sum(defects) AS total FROM part_defects "
        "GROUP BY plant, defect_code ORDER BY plant, defect_code"
    )
    groups = aggregate_groups(("plant", "defect_code"))
    expected = [
        {"plant": k[0], "defect_code": k[1], "n": len(v), "total": sum(v)}
        for k, v in sorted(groups.items())
        if len(v) >= MIN_GROUP
    ]
    assert any(len(v) < MIN_GROUP for v in groups.values())  # the data has small groups
    with shared_shaped.peer(shared_shaped.supplier_b) as peer:
        rows = peer.query(sql, BENCH).to_pylist()
        decision = peer.explain(sql, BENCH)
    assert rows == expected
    assert f"count_star() >= {MIN_GROUP}" in decision.query
    assert decision.relations[0].min_group_size == MIN_GROUP


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("SELECT * FROM part_defects", "* and COLUMNS(...) are not allowed"),
        ("SELECT plant, defects FROM part_defects", "must be grouped or aggregated"),
        ("SELECT plant, count(*) FROM part_defects JOIN plants USING (plant) GROUP BY plant",
         "may read no other dataset"),
        ("SELECT part_no, min(part_no) FROM part_defects GROUP BY part_no", "min() may read"),
        ("SELECT plant, count(*) FROM part_defects WHERE week = DATE '2026-01-05' GROUP BY plant",
         "WHERE may name only grouping columns"),
    ],
)  # fmt: skip
def test_aggregate_only_refusals_say_what_to_write(
    shared_shaped: ShapedSpace, sql: str, words: str
) -> None:
    with shared_shaped.peer(shared_shaped.supplier_b) as peer:
        with pytest.raises(QueryRejected) as refused:
            peer.query(sql, BENCH)
        assert peer.query("SELECT count(*) AS n FROM part_defects", BENCH)["n"][0].as_py() == ROWS
    assert words in str(refused.value)
    assert f"groups of fewer than {MIN_GROUP} rows are not returned" in str(refused.value)


def test_two_datasets_need_a_grant_each_under_one_purpose(shared_shaped: ShapedSpace) -> None:
    join = "SELECT city, count(*) AS n FROM part_defects JOIN plants USING (plant) GROUP BY city"
    with shared_shaped.peer(shared_shaped.supplier_a) as peer:
        with pytest.raises(PermissionDenied, match="purpose benchmark is not allowed"):
            peer.query(join, BENCH)
        assert peer.query(join, VIEW).num_rows == 2


def test_a_row_filter_on_a_column_a_dataset_lacks_denies(shaped: ShapedSpace) -> None:
    both = MASKED_POLICY.replace("datasets: [part_defects]", "datasets: [part_defects, plants]")
    shaped.provider.write_policy("masked.yaml", both.replace("version: 1", "version: 2"))
    for path in (shaped.provider.home / "policies").glob("plants.yaml*"):
        path.unlink()  # masked-view alone grants plants now
    shaped.server.reload()
    with shaped.peer(shaped.supplier_a) as peer:
        with pytest.raises(PermissionDenied) as refused:
            peer.query("SELECT count(*) AS n FROM plants", VIEW)
        assert peer.query("SELECT count(*) AS n FROM part_defects", VIEW).num_rows == 1
    assert "filters rows on column week, which the dataset does not have" in str(refused.value)


def test_conflicting_policies_for_one_purpose_are_refused_until_merged(
    shaped: ShapedSpace,
) -> None:
    clear = policy_text(
        "clear-view",
        members="[supplier-a]",
        purposes=f"[{VIEW}]",
        columns="[plant, part_no]",
    )
    shaped.provider.write_policy("clear.yaml", clear)
    shaped.server.reload()
    with shaped.peer(shaped.supplier_a) as peer:
        with pytest.raises(PermissionDenied) as refused:
            peer.query("SELECT plant FROM part_defects", VIEW)
        # plants is granted by one policy alone: still answered.
        assert peer.query("SELECT count(*) AS n FROM plants", VIEW)["n"][0].as_py() == 3
    assert "must merge them" in str(refused.value)
    assert "clear-view, masked-view" in str(refused.value)
