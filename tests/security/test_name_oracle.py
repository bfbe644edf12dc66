"""No oracle for hidden names: a refused query gets the same answer whether the hidden
column exists or not, through Query and Explain alike, on plain and aggregate-only grants."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connector.errors import ConnectorError, ResourceExhausted
from connector.rate import RateLimit
from connector.server import RunningServer
from tests.conftest import Member, connect, policy_text, write_defects_csv

PURPOSE = "quality-benchmarking"


@pytest.fixture(scope="module")
def offered(
    module_dir: Path,
    module_member: Callable[[str], Member],
    module_serve: Callable[[Member], RunningServer],
) -> tuple[RunningServer, Member]:
    """One server for the module: the probes only query it (16 explains, under the 60 a
    minute a member may send)."""
    provider, grantee = module_member("carmaker"), module_member("supplier-a")
    csv = write_defects_csv(module_dir / "d.csv")
    provider.ingest(csv, "part_defects")
    provider.ingest(csv, "plant_totals")
    provider.write_policy(
        "plain.yaml", policy_text("plain", members="[supplier-a]", columns="[plant, defects]")
    )
    provider.write_policy(
        "agg.yaml",
        policy_text(
            "agg", members="[supplier-a]", datasets="[plant_totals]", columns="[plant, defects]"
        )
        + "aggregate_only: {min_group_size: 3}\n",
    )
    return module_serve(provider), grantee


def _answer(peer: object, method: str, sql: str) -> tuple[str, str]:
    try:
        result = getattr(peer, method)(sql, PURPOSE)
    except ConnectorError as error:
        return type(error).__name__, str(error).replace("supplier_price", "X").replace(
            "nosuch", "X"
        )
    if method == "explain":
        text = "; ".join(result.reasons).replace("supplier_price", "X").replace("nosuch", "X")
        return ("allowed" if result.allow else "denied"), text
    return "answered", ""


@pytest.mark.parametrize(
    "template",
    [
        "SELECT {c} FROM part_defects",
        "SELECT plant FROM part_defects WHERE {c} > 100",
        "SELECT plant FROM part_defects ORDER BY {c}",
        "SELECT count(*) FROM part_defects GROUP BY {c}",
        "SELECT p.{c} FROM part_defects p",
        "SELECT plant, sum(defects) FROM plant_totals WHERE {c} > 1 GROUP BY plant",
        "SELECT {c}, count(*) FROM plant_totals GROUP BY {c}",
        "SELECT plant, sum({c}) FROM plant_totals GROUP BY plant",
    ],
)
@pytest.mark.parametrize("method", ["query", "explain"])
def test_a_hidden_column_and_a_missing_one_get_the_same_answer(
    offered: tuple[RunningServer, Member], template: str, method: str
) -> None:
    server, grantee = offered
    with connect(server, grantee) as peer:
        hidden = _answer(peer, method, template.format(c="supplier_price"))
        missing = _answer(peer, method, template.format(c="nosuch"))
    assert hidden == missing
    assert hidden[0] in ("PermissionDenied", "denied")


def test_explain_is_rate_limited_per_member(
    tmp_path: Path, make_member: Callable[[str], Member], serve: Callable[[Member], RunningServer]
) -> None:
    provider = make_member("carmaker")
    config = provider.home / "connector.toml"
    config.write_text(
        config.read_text().replace("explains_per_minute = 60", "explains_per_minute = 3")
    )
    provider.ingest(write_defects_csv(tmp_path / "d.csv"), "part_defects")
    provider.write_policy("p.yaml", policy_text("p", members="[supplier-a, supplier-b]"))
    server = serve(provider)
    prober, other = make_member("supplier-a"), make_member("supplier-b")
    with connect(server, prober) as peer:
        for _ in range(3):
            assert peer.explain("SELECT plant FROM part_defects", PURPOSE).allow
        with pytest.raises(ResourceExhausted, match="explain requests a minute"):
            peer.explain("SELECT plant FROM part_defects", PURPOSE)
    with connect(server, other) as peer:
        assert peer.explain("SELECT plant FROM part_defects", PURPOSE).allow


def test_rate_limit_refills_with_time() -> None:
    now = [0.0]
    limit = RateLimit(60, clock=lambda: now[0])
    assert all(limit.take("a") == 0 for _ in range(60))
    assert limit.take("a") == pytest.approx(1.0)
    assert limit.take("b") == 0
    now[0] += 1.0
    assert limit.take("a") == 0
