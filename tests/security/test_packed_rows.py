"""Row limits against packing, over mutual TLS: rows packed into lists, strings or maps.

The policy allows 5 rows a query and 20 a day of part_defects (200 rows). Every way of
putting many rows into one result row (aggregates, window aggregates, top-n forms, ARRAY
subqueries, builders over aggregates) is refused, again and again, while the plain rows
still come within the limits; the audit records the refusals. With the guard off, the
sandbox still refuses a result that carries a list the dataset does not hold.

One server serves the module: each test asks as a member of its own, granted a policy of
its own with those limits, so that no test spends another's daily rows (and each request is
decided on one policy, as in a space of its own). The grantees only ask: each has a
certificate of the data space's CA for its member id, not a home of its own.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from connector.audit_chain import read_entries
from connector.client import Peer, PeerIdentity
from connector.config import load_settings
from connector.errors import PermissionDenied, QueryRejected, ResourceExhausted
from connector.identity import CA_CERT_FILE, issue_member_certificate
from connector.server import RunningServer
from connector.sqlguard import QueryShape, inspect_query
from tests.conftest import (
    Member,
    ProviderPair,
    connect,
    from_template,
    policy_text,
    run_cli,
    write_defects_csv,
)

PURPOSE = "quality-benchmarking"
ROW_LIMITS = "limits: {max_rows_per_query: 5, rows_per_day: 20}\n"
GRANTS = 48  # grantees, each with a policy with the row limits: one per test of the server

PACKED = [
    "SELECT list(struct_pack(p := plant, n := part_no, d := defects)) FROM part_defects",
    "SELECT string_agg(plant || ':' || part_no || ':' || defects, ',') FROM part_defects",
    "SELECT group_concat(part_no) FROM part_defects",
    "SELECT listagg(part_no, ',') FROM part_defects",
    "SELECT array_agg(defects ORDER BY week) FROM part_defects",
    "SELECT histogram(part_no) FROM part_defects",
    "SELECT max(defects, 200) FROM part_defects",
    "SELECT min_by(part_no, defects, 200) FROM part_defects",
    "SELECT arg_max(part_no, week, 200) FROM part_defects",
    "SELECT quantile_disc(defects, [0.01, 0.02, 0.03, 0.04, 0.05]) FROM part_defects",
    "SELECT ARRAY(SELECT part_no FROM part_defects)",
    "SELECT [list(part_no), list(plant)] FROM part_defects",
    "SELECT struct_pack(a := list(part_no)) FROM part_defects",
    "SELECT list_value(max(part_no), min(part_no), max(plant)) FROM part_defects",
    "SELECT plant, list(part_no) FROM part_defects GROUP BY plant",
    "SELECT (SELECT string_agg(part_no, ',') FROM part_defects) AS packed",
    "WITH x AS (SELECT list(part_no) AS l FROM part_defects) SELECT l FROM x",
    "SELECT list(part_no) OVER () FROM part_defects LIMIT 1",
    "SELECT string_agg(part_no, ',') OVER (ORDER BY week) FROM part_defects LIMIT 1",
    "SELECT lag(part_no, 7) OVER (ORDER BY week) FROM part_defects LIMIT 1",
    "SELECT lead(part_no, 3) OVER (ORDER BY week), nth_value(part_no, 9) OVER (ORDER BY week) "
    "FROM part_defects LIMIT 1",
    "SELECT max(part_no) OVER (ORDER BY week ROWS BETWEEN 4 PRECEDING AND 4 PRECEDING) "
    "FROM part_defects LIMIT 5",
    "SELECT * FROM (SELECT array_agg(part_no) AS a FROM part_defects) WHERE len(a) > 0",
]


@dataclasses.dataclass(frozen=True)
class Grantee:
    """A member that only asks: its id and the certificate the data space's CA issued it."""

    member_id: str
    identity: PeerIdentity


@dataclasses.dataclass
class Limited:
    """The module's server: carmaker grants member supplier-N policy qN."""

    server: RunningServer
    provider: Member
    certificates: Path  # supplier-N/cert.pem and key.pem
    ca: Path
    unused: Iterator[int]

    def grant(self) -> tuple[str, Grantee]:
        """A policy id and its grantee no other test has asked as."""
        n = next(self.unused)
        assert n < GRANTS, "raise GRANTS: every test needs a grantee of its own"
        folder = self.certificates / f"supplier-{n}"
        identity = PeerIdentity.from_files(folder / "cert.pem", folder / "key.pem", self.ca)
        return f"q{n}", Grantee(f"supplier-{n}", identity)


def _ask(server: RunningServer, grantee: Grantee) -> Peer:
    return Peer(f"127.0.0.1:{server.port}", grantee.identity, timeout=30.0)


def _limited_homes(dataspace: Path, folder: Path, make: Callable[[str], Member]) -> list[Member]:
    provider = make("carmaker")
    # What `connector init` issues a member (its home, keys and database aside, which a
    # member that only asks does not use): 48 homes took seconds.
    for n in range(GRANTS):
        certificates = folder / "grantees" / f"supplier-{n}"
        certificates.mkdir(parents=True)
        issue_member_certificate(dataspace, f"supplier-{n}", certificates)
    provider.ingest(write_defects_csv(folder / "d.csv"), "part_defects")
    policies = [
        provider.write_policy(
            f"q{n}.yaml", policy_text(f"q{n}", members=f"[supplier-{n}]") + ROW_LIMITS, sign=False
        )
        for n in range(GRANTS)
    ]
    assert run_cli("policy", "sign", "--home", provider.home, *policies) == 0
    return [provider]


@pytest.fixture(scope="module")
def limited(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> Limited:
    folder = module_dir / "limited"
    (provider,) = from_template(
        folder, dataspace, "packed-rows", functools.partial(_limited_homes, dataspace)
    )
    return Limited(
        module_serve(provider),
        provider,
        folder / "grantees",
        dataspace / CA_CERT_FILE,
        itertools.count(),
    )


@pytest.fixture
def server(limited: Limited, monkeypatch: pytest.MonkeyPatch) -> RunningServer:
    """The module's server; a guard a test sets on it is put back when the test ends."""
    monkeypatch.setattr(limited.server.provider, "guard", limited.server.provider.guard)
    return limited.server


@pytest.mark.parametrize("sql", PACKED)
def test_packed_rows_do_not_leave_past_the_row_limits(
    limited: Limited, server: RunningServer, sql: str
) -> None:
    policy, grantee = limited.grant()
    with _ask(server, grantee) as peer:
        for _ in range(6):  # the attack found it answered six times in a row
            # Refused as packing under the row limits, or earlier by the value-size rule
            # (a packed value a subquery or window could repeat): never answered.
            with pytest.raises(
                (PermissionDenied, QueryRejected),
                match=r"limit rows|many rows|window function|per value",
            ):
                peer.fetch(sql, PURPOSE)
        plain = peer.fetch("SELECT plant, part_no FROM part_defects", PURPOSE)
        assert (plain.table.num_rows, plain.receipt.limited_by) == (5, "max_rows_per_query")
        assert peer.fetch("SELECT count(*), max(defects) FROM part_defects", PURPOSE).receipt.rows
    entries = [e for e in read_entries(load_settings(limited.provider.home).audit_log)]
    refused = [
        e
        for e in entries
        if e.get("kind") == "query"
        and e.get("member_id") == grantee.member_id
        and e.get("outcome") in ("denied", "rejected")
    ]
    assert len(refused) == 6
    if refused[0]["outcome"] == "denied":
        assert all("limit rows" in e["reasons"][0] for e in refused)
        assert refused[0]["policies"] == [{"id": policy, "version": 1}]


def test_the_daily_row_limit_holds_over_many_queries(
    limited: Limited, server: RunningServer
) -> None:
    _, grantee = limited.grant()
    received = 0
    with _ask(server, grantee) as peer:
        for sql in PACKED[:6]:
            with pytest.raises(PermissionDenied):
                peer.fetch(sql, PURPOSE)
        for offset in range(0, 40, 5):
            try:
                result = peer.fetch(
                    f"SELECT part_no FROM part_defects ORDER BY week, part_no OFFSET {offset}",
                    PURPOSE,
                )
            except ResourceExhausted:
                break
            received += result.table.num_rows
    assert received == 20


def test_packing_is_allowed_where_no_row_limit_applies(
    provider_pair: ProviderPair, serve: Callable[[Member], RunningServer]
) -> None:
    provider, grantee = provider_pair(policy_extra="limits: {queries_per_day: 100}\n")
    with connect(serve(provider), grantee) as peer:
        result = peer.fetch(PACKED[0], PURPOSE)
    assert len(result.table.column(0)[0].as_py()) == 200


def _guard_blind_to_packing(sql: str) -> QueryShape:
    return dataclasses.replace(inspect_query(sql, value_sizes=False), packing="")


# Builders over a few aggregates are bounded by the query's text: only the guard refuses them.
BY_PLAN = [s for s in PACKED if not s.startswith("SELECT list_value(")]


@pytest.mark.parametrize("sql", BY_PLAN)
def test_the_sandbox_refuses_packing_with_the_guard_blind(
    limited: Limited, server: RunningServer, sql: str
) -> None:
    _, grantee = limited.grant()
    server.provider.guard = _guard_blind_to_packing  # this test only
    with _ask(server, grantee) as peer:
        for _ in range(2):  # again: from the plan and its packing as the sandbox kept them
            with pytest.raises(PermissionDenied, match="policies limit rows"):
                peer.fetch(sql, PURPOSE)
        assert peer.fetch("SELECT count(*), max(defects) FROM part_defects", PURPOSE).receipt.rows
