"""Integer aggregates arrive as integers: int64 where DuckDB would give decimal128(38, 0)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from connector.errors import QueryRejected
from tests.conftest import Space

PURPOSE = "quality-benchmarking"


def test_sums_of_integers_are_int64(space: Space) -> None:
    with space.peer() as peer:
        table = peer.query(
            "SELECT plant, sum(defects) AS total, count(*) AS n, avg(defects) AS mean "
            "FROM part_defects GROUP BY plant ORDER BY plant",
            PURPOSE,
        )
    assert table.schema.field("total").type == pa.int64()
    assert table.schema.field("n").type == pa.int64()
    assert table.schema.field("mean").type == pa.float64()
    assert all(isinstance(v, int) for v in table.column("total").to_pylist())


def test_a_sum_beyond_64_bits_is_refused_with_the_fix(space: Space, tmp_path: Path) -> None:
    with space.peer() as peer, pytest.raises(QueryRejected, match="does not fit in 64 bits"):
        peer.query("SELECT sum(defects) * 9223372036854775807 AS big FROM part_defects", PURPOSE)
