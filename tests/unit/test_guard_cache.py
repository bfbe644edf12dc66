"""The guard's verdicts are kept per exact text: the same immutable shape for the same text,
never for another, and a refusal is refused again."""

from __future__ import annotations

import dataclasses

import pytest

from connector.errors import QueryRejected
from connector.sqlguard import MAX_CACHED_LENGTH, clear_guard_cache, inspect_query


def test_the_same_text_gives_the_same_immutable_shape() -> None:
    clear_guard_cache()
    sql = "SELECT plant, sum(defects) FROM part_defects GROUP BY plant"
    first = inspect_query(sql)
    assert inspect_query(sql) is first
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.datasets = ("secret",)  # type: ignore[misc]
    assert isinstance(first.column_refs, frozenset) and isinstance(first.datasets, tuple)


def test_texts_that_differ_in_any_character_are_inspected_apart() -> None:
    plain = inspect_query("SELECT plant FROM part_defects")
    other = inspect_query("SELECT plant FROM Part_defects ")
    assert plain is not other and plain.sha256 != other.sha256
    assert inspect_query("SELECT plant FROM secret").datasets == ("secret",)


@pytest.mark.parametrize("sql", ["SELECT * FROM read_csv('/etc/passwd')", "DROP TABLE x"])
def test_a_refusal_is_refused_every_time(sql: str) -> None:
    for _ in range(3):
        with pytest.raises(QueryRejected):
            inspect_query(sql)


def test_the_length_bound_and_value_size_rule_are_part_of_the_key() -> None:
    sql = "SELECT plant FROM part_defects"
    inspect_query(sql)
    with pytest.raises(QueryRejected):
        inspect_query(sql, max_length=10)
    long = "SELECT plant FROM part_defects WHERE plant = '" + "x" * MAX_CACHED_LENGTH + "'"
    assert inspect_query(long, max_length=10 * MAX_CACHED_LENGTH) is not inspect_query(
        long, max_length=10 * MAX_CACHED_LENGTH
    )  # too long to keep: inspected each time
