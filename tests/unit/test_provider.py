"""The answering side without any transport: `Provider` built from a real member home.

Who is asking (certificate checks), what the catalog lists, what explain and query decide,
the query slots, and what each refusal leaves in the audit log.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pytest

from connector.arrow_stream import read_ipc_pieces
from connector.audit_chain import read_entries
from connector.audit_entry import AuditEntry
from connector.config import load_settings
from connector.errors import (
    NotAuthenticated,
    PermissionDenied,
    QueryRejected,
    ResourceExhausted,
)
from connector.home_provider import build_provider
from connector.identity import MemberIdentity, create_dataspace_ca, issue_member_certificate
from connector.policy.ref import PolicyRef
from connector.provider import Provider
from connector.request import PeerRequest
from tests.conftest import Member, ProviderPair, policy_text, write_defects_csv

PURPOSE = "quality-benchmarking"
GRANTED = ("plant", "part_no", "defect_code", "defects", "week")


def _open(owner: Member) -> Provider:
    return build_provider(load_settings(owner.home))


def _close(provider: Provider) -> None:
    provider.sandbox.close()
    provider.audit.close()
    provider.quotas.close()


@pytest.fixture
def built(
    provider_pair: ProviderPair,
) -> Iterator[Callable[..., tuple[Provider, Member, Member]]]:
    """Build the Provider of a carmaker home of the test's own, with settings changed."""
    opened: list[Provider] = []

    def build(**settings: str) -> tuple[Provider, Member, Member]:
        owner, grantee = provider_pair(settings=settings)
        opened.append(_open(owner))
        return opened[-1], owner, grantee

    yield build
    for provider in opened:
        _close(provider)


@pytest.fixture(scope="module")
def homes(module_dir: Path, module_member: Callable[[str], Member]) -> tuple[Member, Member]:
    """carmaker with part_defects and policy q for supplier-a, shared by the module."""
    owner, grantee = module_member("carmaker"), module_member("supplier-a")
    owner.ingest(write_defects_csv(module_dir / "d.csv"), "part_defects")
    owner.write_policy("q.yaml", policy_text("q", members="[supplier-a]"))
    return owner, grantee


@pytest.fixture
def carmaker(homes: tuple[Member, Member]) -> Iterator[tuple[Provider, Member, Member]]:
    """A Provider opened on the module's homes for one test (its audit log starts empty)."""
    owner, grantee = homes
    (owner.home / "audit" / "audit.jsonl").unlink(missing_ok=True)
    provider = _open(owner)
    yield provider, owner, grantee
    _close(provider)


def _cert(member: Member) -> bytes:
    return member.identity().cert_pem


def _member(provider: Provider, member: Member) -> MemberIdentity:
    return provider.authenticate(_cert(member), AuditEntry("query"))


def _request(sql: str, purpose: str = PURPOSE) -> PeerRequest:
    return PeerRequest.checked(sql, purpose, 0, "")


def _entries(owner: Member) -> list[dict[str, object]]:
    path = owner.home / "audit" / "audit.jsonl"
    return [e for e in read_entries(path) if e["type"] == "request"]


def test_authenticate_names_the_member_and_records_it(
    carmaker: tuple[Provider, Member, Member],
) -> None:
    provider, _, grantee = carmaker
    entry = AuditEntry("catalog")
    identity = provider.authenticate(_cert(grantee), entry)
    assert identity.member_id == entry.member_id == "supplier-a"
    assert identity.dataspace == "test-space"


@pytest.mark.parametrize(
    ("cert", "words"),
    [
        (None, "no client certificate"),
        (b"", "no client certificate"),
        (b"-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n",
         "could not be read"),
    ],
)  # fmt: skip
def test_authenticate_refuses_a_missing_or_unreadable_certificate(
    carmaker: tuple[Provider, Member, Member], cert: bytes | None, words: str
) -> None:
    provider, _, _ = carmaker
    with pytest.raises(NotAuthenticated, match=words):
        provider.authenticate(cert, AuditEntry("catalog"))


def test_authenticate_refuses_a_member_of_another_data_space(
    tmp_path: Path, carmaker: tuple[Provider, Member, Member]
) -> None:
    provider, _, _ = carmaker
    create_dataspace_ca(tmp_path / "other", "other-space")
    issue_member_certificate(tmp_path / "other", "supplier-a", tmp_path / "stranger")
    with pytest.raises(NotAuthenticated) as refused:
        provider.authenticate((tmp_path / "stranger" / "cert.pem").read_bytes(), AuditEntry("q"))
    assert "'other-space'" in str(refused.value) and "'test-space'" in str(refused.value)


def test_authenticate_refuses_a_revoked_member(
    built: Callable[..., tuple[Provider, Member, Member]],
) -> None:
    provider, _, grantee = built(**{"members = []": 'members = ["supplier-a"]'})
    with pytest.raises(NotAuthenticated, match="revoked"):
        provider.authenticate(_cert(grantee), AuditEntry("catalog"))


def test_catalog_lists_only_what_is_granted_and_is_on_record(
    carmaker: tuple[Provider, Member, Member],
) -> None:
    provider, owner, grantee = carmaker
    (dataset,) = provider.catalog(_member(provider, grantee), AuditEntry("catalog"))
    assert dataset.info.name == "part_defects"
    assert tuple(c.name for c in dataset.columns) == GRANTED
    assert dataset.grant.purposes == (PURPOSE,)
    assert dataset.grant.policies == (("q", 1),)
    (entry,) = _entries(owner)
    assert (entry["kind"], entry["outcome"], entry["datasets"]) == (
        "catalog",
        "answered",
        ["part_defects"],
    )


def test_explain_decides_without_running_and_says_why(
    carmaker: tuple[Provider, Member, Member],
) -> None:
    provider, owner, grantee = carmaker
    member = _member(provider, grantee)
    allowed = provider.explain(member, _request("SELECT plant FROM part_defects"), AuditEntry("e"))
    assert allowed.decision.allow
    assert allowed.sql == "SELECT plant FROM part_defects"
    assert [r.dataset for r in allowed.relations] == ["part_defects"]
    denied = provider.explain(
        member, _request("SELECT supplier_price FROM part_defects"), AuditEntry("e")
    )
    assert not denied.decision.allow and denied.sql == "" and denied.relations == ()
    assert any("supplier_price" in r for r in denied.decision.reasons)
    assert [(e["decision"], e["outcome"]) for e in _entries(owner)] == [
        ("allow", "answered"),
        ("deny", "answered"),
    ]


def test_query_streams_arrow_and_signs_a_receipt_after_the_audit_entry(
    carmaker: tuple[Provider, Member, Member],
) -> None:
    provider, owner, grantee = carmaker
    sql = "SELECT plant, count(*) AS n FROM part_defects GROUP BY plant ORDER BY plant"
    run = provider.query(_member(provider, grantee), _request(sql), AuditEntry("query"))
    table: pa.Table = read_ipc_pieces(run.pieces())
    fields, token = run.receipt()
    assert table.column("n").to_pylist() == [50, 50, 50, 50]
    assert fields.rows == 4 and fields.member_id == "supplier-a"
    assert fields.policies == (PolicyRef("q", 1),)
    assert token.count(".") == 2
    (entry,) = _entries(owner)
    assert entry["seq"] == fields.audit_seq
    assert entry["result_sha256"] == fields.result_sha256


def test_a_denied_query_raises_before_anything_runs_with_the_reasons(
    carmaker: tuple[Provider, Member, Member],
) -> None:
    provider, owner, grantee = carmaker
    member = _member(provider, grantee)
    entry = AuditEntry("query")
    with pytest.raises(PermissionDenied) as refused:
        provider.query(member, _request("SELECT plant FROM part_defects", "ads"), entry)
    assert refused.value.reasons == [
        "purpose ads is not allowed for dataset part_defects (allowed: quality-benchmarking)"
    ]
    assert entry.decision == "deny" and entry.rows == 0
    assert _entries(owner) == []  # the servicer records the refusal (Provider.record)


def test_hostile_sql_is_rejected_by_the_guard_before_any_decision(
    carmaker: tuple[Provider, Member, Member],
) -> None:
    provider, _, grantee = carmaker
    with pytest.raises(QueryRejected, match="read_csv"):
        provider.query(
            _member(provider, grantee),
            _request("SELECT * FROM read_csv('/etc/passwd')"),
            AuditEntry("query"),
        )


def test_queries_beyond_the_slots_are_refused_until_one_ends(
    built: Callable[..., tuple[Provider, Member, Member]],
) -> None:
    # The refused query waits queue_seconds (5 by default) for a slot first: shortened.
    provider, _, grantee = built(
        **{
            "max_concurrent_queries = 8": "max_concurrent_queries = 1",
            "queue_seconds = 5 ": "queue_seconds = 0.2 ",
        }
    )
    member = _member(provider, grantee)
    sql = "SELECT count(*) AS n FROM part_defects"
    first = provider.query(member, _request(sql), AuditEntry("query"))
    # One slot in all: the member's share (at least 1) is the connector's whole capacity.
    with pytest.raises(ResourceExhausted, match=r"maximum number of queries|the most one member"):
        provider.query(member, _request(sql), AuditEntry("query"))
    first.close()
    second = provider.query(member, _request(sql), AuditEntry("query"))
    assert read_ipc_pieces(second.pieces())["n"].to_pylist() == [200]


@pytest.mark.parametrize(
    ("error", "outcome", "decision", "reasons"),
    [
        (PermissionDenied(["a; b", "c"]), "denied", "deny", ["a; b", "c"]),
        (QueryRejected("bad", position=4), "rejected", "", ["bad (at character 5)"]),
        (ResourceExhausted("full"), "exhausted", "", ["full"]),
        (RuntimeError("bug"), "failed", "", []),
    ],
)
def test_record_writes_the_outcome_and_reasons_an_error_implies(
    carmaker: tuple[Provider, Member, Member],
    error: BaseException,
    outcome: str,
    decision: str,
    reasons: list[str],
) -> None:
    provider, owner, _ = carmaker
    seq = provider.record(AuditEntry("query", member_id="supplier-a"), error)
    (entry,) = _entries(owner)
    assert entry["seq"] == seq
    assert (entry["outcome"], entry["decision"], entry["reasons"]) == (outcome, decision, reasons)
