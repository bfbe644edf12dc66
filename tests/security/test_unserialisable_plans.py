"""A query whose bound plan DuckDB cannot serialise is refused with a reason, not INTERNAL.

DuckDB's json_serialize_plan returns an empty string for some plans (an integer literal of
more than 38 digits, anywhere in the query); the sandbox's plan check cannot check such a
plan, so the query is refused as INVALID_ARGUMENT, recorded, and the server keeps serving.
Over mutual TLS, with the guard on and off, on a plain grant and on shaped ones.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from connector.audit_chain import read_entries
from connector.errors import QueryRejected
from connector.sqlguard import QueryShape, inspect_query
from tests.conftest import Space
from tests.integration.test_shaped_answers import (  # noqa: F401 (the fixture)
    BENCH,
    VIEW,
    ShapedSpace,
    shared_shaped,
)
from tests.security.test_hostile_sql import PURPOSE, _no_guard

HUGE = "9" * 45
UNSERIALISABLE = [
    f"SELECT {HUGE} FROM part_defects",
    f"SELECT count(*) AS n FROM part_defects WHERE defects < {'9' * 39}",
    f"SELECT count(*) AS n FROM part_defects WHERE defects IN (1, {HUGE})",
    f"SELECT {'9' * 40}::DOUBLE AS x FROM part_defects",
    f"SELECT n FROM (SELECT {HUGE} AS n FROM part_defects) LIMIT 1",
]
GUARDS = pytest.mark.parametrize("guard", [inspect_query, _no_guard], ids=["guarded", "unguarded"])


# The module's servers are shared (the tests only query them); the guard a test sets is put
# back when it ends.
@pytest.fixture
def space(shared_space: Space, monkeypatch: pytest.MonkeyPatch) -> Space:
    monkeypatch.setattr(shared_space.server.provider, "guard", shared_space.server.provider.guard)
    return shared_space


@pytest.fixture
def shaped(
    shared_shaped: ShapedSpace,  # noqa: F811 (the fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> ShapedSpace:
    monkeypatch.setattr(shared_shaped.server.provider, "guard", shared_shaped.server.provider.guard)
    return shared_shaped


@GUARDS
@pytest.mark.parametrize("sql", UNSERIALISABLE)
def test_an_unserialisable_plan_is_refused_with_a_reason(
    space: Space, guard: Callable[[str], QueryShape], sql: str
) -> None:
    space.server.provider.guard = guard  # this test only
    with space.peer() as peer:
        with pytest.raises(QueryRejected, match="cannot check the plan"):
            peer.query(sql, PURPOSE)
        assert peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE)["n"][0].as_py() == 200
    path = space.provider.home / "audit" / "audit.jsonl"
    outcomes = [
        e["outcome"]
        for e in read_entries(path)
        if e.get("kind") == "query" and e.get("type") == "request"
    ]
    assert outcomes[-2:] == ["rejected", "answered"]


@GUARDS
@pytest.mark.parametrize("who", ["masked", "aggregate-only"])
def test_an_unserialisable_plan_is_refused_on_shaped_grants(
    shaped: ShapedSpace,
    guard: Callable[[str], QueryShape],
    who: str,
) -> None:
    shaped.server.provider.guard = guard
    member, purpose = (shaped.supplier_a, VIEW) if who == "masked" else (shaped.supplier_b, BENCH)
    sql = (
        f"SELECT count(*) AS n FROM part_defects WHERE defects < {'9' * 39}"
        if who == "masked"
        else f"SELECT plant, count(*) AS n FROM part_defects WHERE plant < '{HUGE}' "
        f"AND {HUGE} > 1 GROUP BY plant"
    )
    with shaped.peer(member) as peer:
        with pytest.raises(QueryRejected):
            peer.query(sql, purpose)
        assert peer.query("SELECT count(*) AS n FROM part_defects", purpose).num_rows == 1
