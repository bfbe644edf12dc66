"""Differencing two allowed groupings, over mutual TLS against a real server (issue 16, 1).

With K = 3, `GROUP BY plant, week` minus `GROUP BY plant, week, defect_code` gives back the
one row the finer query drops (defects = 777). supplier-b reads part_defects under noise
(epsilon 1 a query, 3 a day, defects clamped to [0, 1000]); supplier-a reads it exactly but
only grouped as the owner declared. The attack must not return the exact value, repeating
it to average the noise away must run out of budget first, min/max are refused under noise,
an undeclared grouping is refused, and the spent budget survives a restart.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from connector.client import Peer
from connector.errors import QueryRejected, ResourceExhausted
from connector.server import RunningServer
from tests.conftest import Member, connect, from_template, policy_text, run_cli

NOISY = "noisy-benchmark"
DECLARED = "declared-groups"
PLAIN = "plain-aggregates"
K = 3
SECRET = 777
EPSILON, PER_DAY = 1.0, 3.0
WEEKS = (dt.date(2026, 1, 5), dt.date(2026, 1, 12))
COARSE = (
    "SELECT plant, week, sum(defects) AS s, count(*) AS n FROM part_defects "
    "GROUP BY plant, week ORDER BY plant, week"
)
FINE = (
    "SELECT plant, week, defect_code, sum(defects) AS s, count(*) AS n FROM part_defects "
    "GROUP BY plant, week, defect_code"
)
COLUMNS = "[plant, week, defect_code, defects]"
NOISY_POLICY = policy_text(
    "noisy", members="[supplier-b]", purposes=f"[{NOISY}]", columns=COLUMNS
) + (
    "  mask: {part_no: hash}\n"
    "aggregate_only:\n"
    f"  min_group_size: {K}\n"
    f"  noise: {{epsilon: {EPSILON}, epsilon_per_day: {PER_DAY}, bounds: {{defects: [0, 1000]}}}}\n"
)
DECLARED_POLICY = policy_text(
    "declared", members="[supplier-a]", purposes=f"[{DECLARED}]", columns=COLUMNS
) + (f"aggregate_only: {{min_group_size: {K}, group_by: [[plant, week]]}}\n")
PLAIN_POLICY = policy_text(
    "plain", members="[supplier-c]", purposes=f"[{PLAIN}]", columns=COLUMNS
) + (f"aggregate_only: {{min_group_size: {K}}}\n")


def rows() -> list[tuple[str, str, dt.date, int]]:
    """(plant, defect_code, week, defects): each (plant, week) holds 5 rows of D1 and 4 of
    D2; (Regensburg, first week) also holds one D9 row with the secret value."""
    found = []
    for plant in ("Regensburg", "Dingolfing"):
        for week in WEEKS:
            found += [(plant, "D1", week, i % 7) for i in range(5)]
            found += [(plant, "D2", week, 10 + i) for i in range(4)]
    found.append(("Regensburg", "D9", WEEKS[0], SECRET))
    return found


@dataclass
class Space:
    provider: Member
    members: dict[str, Member]
    server: RunningServer
    serve: Callable[[Member], RunningServer]

    def peer(self, member: str) -> Peer:
        return connect(self.server, self.members[member], timeout=60)

    def restart(self) -> None:
        self.server.stop(grace=1)
        self.server = self.serve(self.provider)


def space_homes(directory: Path, make: Callable[[str], Member]) -> list[Member]:
    """carmaker with the noisy, declared and plain grants; supplier-a, -b and -c."""
    provider = make("carmaker")
    members = [make(m) for m in ("supplier-a", "supplier-b", "supplier-c")]
    data = directory / "defects.csv"
    lines = ["plant,part_no,defect_code,defects,week"]
    lines += [f"{p},P-1,{c},{d},{w}" for p, c, w, d in rows()]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    provider.ingest(data, "part_defects", "Weekly defects")
    provider.write_policy("noisy.yaml", NOISY_POLICY)
    provider.write_policy("declared.yaml", DECLARED_POLICY)
    provider.write_policy("plain.yaml", PLAIN_POLICY)
    return [provider, *members]


def build_space(
    directory: Path, dataspace: Path, serve: Callable[[Member], RunningServer]
) -> Space:
    """The space from a copy of its homes made once per session (before any server ran)."""
    provider, *members = from_template(directory, dataspace, "differencing", space_homes)
    return Space(provider, {m.member_id: m for m in members}, serve(provider), serve)


@pytest.fixture
def space(tmp_path: Path, dataspace: Path, serve: Callable[[Member], RunningServer]) -> Space:
    """A space of the test's own: for tests that spend supplier-b's privacy budget."""
    return build_space(tmp_path, dataspace, serve)


@pytest.fixture(scope="module")
def unspent(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> Space:
    """One space for the tests that spend no privacy budget (they check it is all left)."""
    return build_space(module_dir, dataspace, module_serve)


def recovered(coarse: pa.Table, fine: pa.Table) -> float:
    """The attack: the coarse group's sum minus the sums of its finer groups."""
    first = {"plant": "Regensburg", "week": WEEKS[0]}
    (cell,) = [r for r in coarse.to_pylist() if all(r[k] == v for k, v in first.items())]
    parts = [r["s"] for r in fine.to_pylist() if all(r[k] == v for k, v in first.items())]
    return float(cell["s"] - sum(parts))


def test_the_attack_recovers_the_row_without_a_defence(unspent: Space) -> None:
    """The control: min_group_size alone lets the difference give the dropped row away."""
    with unspent.peer("supplier-c") as peer:
        assert recovered(peer.query(COARSE, PLAIN), peer.query(FINE, PLAIN)) == SECRET


def test_the_attack_under_noise_does_not_return_the_exact_value(space: Space) -> None:
    exact_sums = {(p, w): 0 for p in ("Regensburg", "Dingolfing") for w in WEEKS}
    for plant, _, week, defects in rows():
        exact_sums[plant, week] += defects
    with space.peer("supplier-b") as peer:
        coarse, fine = peer.query(COARSE, NOISY), peer.query(FINE, NOISY)
    assert recovered(coarse, fine) != SECRET
    noisy = {(r["plant"], r["week"]): r["s"] for r in coarse.to_pylist()}
    # Four sums with Laplace noise of scale 2000: none exact, bar a 1-in-10^12 chance.
    assert len(noisy) == 4
    assert all(noisy[cell] != exact_sums[cell] for cell in noisy)
    assert coarse.column_names == ["plant", "week", "s", "n"]
    assert coarse.schema.field("n").type == pa.int64()
    assert coarse.schema.field("s").type == pa.int64()
    assert [r["plant"] for r in coarse.to_pylist()] == sorted(
        r["plant"] for r in coarse.to_pylist()
    )


def test_averaging_the_noise_away_runs_out_of_budget_first(space: Space) -> None:
    """Averaging n attacks narrows the noise by sqrt(n): with a scale of 2000 it would take
    millions; the budget answers three queries a day (one attack and a half)."""
    estimates: list[float] = []
    answered = 0
    with space.peer("supplier-b") as peer:
        with pytest.raises(ResourceExhausted, match=r"privacy budget.*resets at"):
            for _ in range(100):
                coarse = peer.query(COARSE, NOISY)
                answered += 1
                fine = peer.query(FINE, NOISY)
                answered += 1
                estimates.append(recovered(coarse, fine))
        # Explain still answers, spends nothing, and says the budget is gone.
        decision = peer.explain(COARSE, NOISY)
    assert answered == int(PER_DAY / EPSILON)
    assert len(estimates) == 1 and estimates[0] != SECRET
    (relation,) = decision.relations
    assert relation.noise is not None and relation.noise.epsilon_remaining == 0


def test_the_budget_survives_a_restart(space: Space) -> None:
    with space.peer("supplier-b") as peer:
        for _ in range(int(PER_DAY / EPSILON)):
            peer.query(COARSE, NOISY)
    space.restart()
    with space.peer("supplier-b") as peer:
        with pytest.raises(ResourceExhausted, match="privacy budget"):
            peer.query(COARSE, NOISY)
        (entry,) = peer.catalog()
    assert entry.noise is not None and entry.noise.epsilon_remaining == 0
    # Another member's budget is its own.
    with space.peer("supplier-a") as peer:
        assert (
            peer.query(
                "SELECT plant, week, count(*) AS n FROM part_defects GROUP BY plant, week", DECLARED
            ).num_rows
            == 4
        )


# (property tested, select list after "plant,", what follows GROUP BY plant)
REFUSED_UNDER_NOISE = [
    ("max returns one row's exact value", "max(defects)", ""),
    ("min", "min(defects) AS m", ""),
    ("stddev", "stddev(defects)", ""),
    ("variance", "var_pop(defects)", ""),
    ("an expression over an aggregate", "sum(defects) + 0 AS s", ""),
    ("a rounded aggregate", "round(avg(defects), 1)", ""),
    ("HAVING tests exact aggregates", "count(*)", " HAVING sum(defects) > 100"),
    ("ORDER BY an aggregate", "sum(defects) AS s", " ORDER BY s"),
    ("ORDER BY an aggregate expression", "count(*)", " ORDER BY sum(defects)"),
    ("a sum of an unbounded column", "sum(week)", ""),
    ("count DISTINCT", "count(DISTINCT defects)", ""),
    ("a constant column", "1 AS one, count(*)", ""),
    ("FILTER", "sum(defects) FILTER (WHERE week > DATE '2026-01-06')", ""),
    ("a CASE inside sum", "sum(CASE WHEN defects > 100 THEN 1000 ELSE 0 END)", ""),
    ("a grouping column under a function", "upper(plant), count(*)", ""),
]


@pytest.mark.parametrize(
    ("name", "items", "tail"), REFUSED_UNDER_NOISE, ids=[n for n, _, _ in REFUSED_UNDER_NOISE]
)
def test_non_noisy_aggregates_are_refused_under_noise(
    unspent: Space, name: str, items: str, tail: str
) -> None:
    sql = f"SELECT plant, {items} FROM part_defects GROUP BY plant{tail}"
    with unspent.peer("supplier-b") as peer:
        with pytest.raises(QueryRejected) as refused:
            peer.query(sql, NOISY)
        assert "noise" in refused.value.message or "not allowed" in refused.value.message, name
        with pytest.raises(QueryRejected):
            peer.explain(sql, NOISY)
        # A refusal spends no budget.
        (entry,) = peer.catalog()
    assert entry.noise is not None and entry.noise.epsilon_remaining == PER_DAY


def test_distinct_answers_are_refused_under_noise(unspent: Space) -> None:
    with unspent.peer("supplier-b") as peer, pytest.raises(QueryRejected, match="noise"):
        peer.query("SELECT DISTINCT plant, count(*) FROM part_defects GROUP BY plant", NOISY)


def test_noisy_answers_keep_the_peers_names_order_and_types(space: Space) -> None:
    sql = (
        "SELECT avg(defects) AS mean_defects, plant AS site, count(*), count(defects) AS c, "
        "sum(defects) FROM part_defects WHERE plant = 'Dingolfing' GROUP BY plant LIMIT 5"
    )
    with space.peer("supplier-b") as peer:
        table = peer.query(sql, NOISY)
    assert table.column_names == ["mean_defects", "site", "count_star()", "c", "sum(defects)"]
    assert [f.type for f in table.schema] == [
        pa.float64(), pa.string(), pa.int64(), pa.int64(), pa.int64(),
    ]  # fmt: skip
    assert table.column("site").to_pylist() == ["Dingolfing"]


def test_explain_and_catalog_show_the_noise_and_spend_nothing(unspent: Space) -> None:
    with unspent.peer("supplier-b") as peer:
        for _ in range(5):
            decision = peer.explain(COARSE, NOISY)
        (entry,) = peer.catalog()
    assert decision.allow
    (relation,) = decision.relations
    assert relation.noise is not None
    assert relation.noise.epsilon == EPSILON and relation.noise.epsilon_per_day == PER_DAY
    assert relation.noise.bounds == {"defects": (0.0, 1000.0)}
    assert relation.noise.epsilon_remaining == PER_DAY
    assert relation.noise.budget_resets_at is not None
    # count(*) and sum(defects) share epsilon 1: 0.5 each; sum's sensitivity is 1000.
    assert any("sum(defects)" in m and "scale 2000" in m for m in relation.noise.mechanisms)
    assert any("count(*)" in m and "scale 2" in m for m in relation.noise.mechanisms)
    assert entry.noise is not None and entry.noise.epsilon_remaining == PER_DAY
    assert "greatest(0, least(1000, defects))" in relation.definition


def test_a_grouping_the_owner_did_not_declare_is_refused(unspent: Space) -> None:
    with unspent.peer("supplier-a") as peer:
        (entry,) = peer.catalog()
        assert entry.group_by == (("plant", "week"),)
        coarse = peer.query(COARSE, DECLARED)  # declared: answered exactly
        assert {r["n"] for r in coarse.to_pylist()} >= {10, 9}
        for sql in (
            FINE,
            "SELECT plant, count(*) FROM part_defects GROUP BY plant",
            "SELECT count(*) FROM part_defects",
            "SELECT defect_code, count(*) FROM part_defects GROUP BY defect_code",
            "SELECT week, plant, defect_code, count(*) FROM part_defects GROUP BY week, plant, "
            "defect_code",
        ):
            with pytest.raises(QueryRejected, match="not a grouping the owner declared"):
                peer.query(sql, DECLARED)
        # The order of the columns within a declared set does not matter.
        assert (
            peer.query(
                "SELECT week, plant, count(*) AS n FROM part_defects GROUP BY week, plant", DECLARED
            ).num_rows
            == 4
        )


def test_the_cli_prints_the_noise_terms_and_the_budget(
    unspent: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    peer_args = (
        "--home",
        unspent.members["supplier-b"].home,
        "--to",
        f"127.0.0.1:{unspent.server.port}",
    )
    capsys.readouterr()
    assert run_cli("catalog", *peer_args) == 0
    catalog = capsys.readouterr().out
    assert "noise: epsilon 1 a query" in catalog and "defects in [0, 1000]" in catalog
    assert "privacy budget: 3 of 3 left today" in catalog
    assert run_cli("explain", *peer_args, "--purpose", NOISY, COARSE) == 0
    explained = capsys.readouterr().out
    assert "noised: sum(defects): discrete Laplace noise, scale 2000" in explained
    assert "privacy budget: 3 of 3 left today" in explained
    assert run_cli("catalog", *peer_args, "--format", "json") == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["noise"]["epsilon_remaining"] == PER_DAY
    assert entry["noise"]["bounds"] == {"defects": [0, 1000]}
