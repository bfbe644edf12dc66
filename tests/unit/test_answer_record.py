"""Nothing of an answer leaves before the request is on disk, with one audit entry where one
is enough: a small answer is worked out whole and recorded before its first byte; a long one
has an "opened" entry before its first byte and its final entry before the receipt."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.arrow_stream import read_ipc_pieces
from connector.audit_chain import read_entries
from connector.audit_entry import AuditEntry
from connector.config import load_settings
from connector.errors import AnswerTooLarge, AuditUnavailable, StateUnavailable
from connector.home_provider import build_provider
from connector.provider import Provider
from connector.query_run import HELD_ANSWER_BYTES, QueryRun
from connector.request import PeerRequest
from tests.conftest import Member, policy_text, write_defects_csv

PURPOSE = "quality-benchmarking"
SMALL = "SELECT plant, defects FROM part_defects"  # 200 rows
LONG = "SELECT a.plant, b.week FROM part_defects a CROSS JOIN part_defects b"  # 40,000 rows


@pytest.fixture(scope="module")
def homes(module_dir: Path, module_member: Callable[[str], Member]) -> tuple[Member, Member]:
    owner, grantee = module_member("carmaker"), module_member("supplier-a")
    owner.ingest(write_defects_csv(module_dir / "d.csv"), "part_defects")
    limits = "limits: {queries_per_day: 10000, rows_per_day: 10000000}\n"
    owner.write_policy("q.yaml", policy_text("q", members="[supplier-a]") + limits)
    return owner, grantee


@pytest.fixture
def provider(homes: tuple[Member, Member]) -> Iterator[Provider]:
    owner, _ = homes
    (owner.home / "audit" / "audit.jsonl").unlink(missing_ok=True)
    built = build_provider(load_settings(owner.home))
    yield built
    built.sandbox.close()
    built.audit.close()
    built.quotas.close()


def _run(provider: Provider, grantee: Member, sql: str) -> QueryRun:
    entry = AuditEntry("query", request_id="r-1")
    member = provider.authenticate(grantee.identity().cert_pem, entry)
    return provider.query(member, PeerRequest.checked(sql, PURPOSE, 0, "r-1"), entry)


def _on_disk(provider: Provider) -> list[dict[str, Any]]:
    return [e for e in read_entries(provider.audit.path) if e["type"] != "checkpoint"]


def test_a_small_answer_is_on_record_whole_before_its_first_byte(
    provider: Provider, homes: tuple[Member, Member]
) -> None:
    run = _run(provider, homes[1], SMALL)
    pieces = run.pieces()
    first = next(pieces)
    entries = _on_disk(provider)  # the peer could see the first byte now
    assert [(e["type"], e["outcome"], e["rows"]) for e in entries] == [("request", "answered", 200)]
    rest = list(pieces)
    assert read_ipc_pieces([first, *rest]).num_rows == 200
    assert entries[0]["bytes"] == len(first) + sum(map(len, rest)) <= HELD_ANSWER_BYTES
    fields, _ = run.receipt()
    assert fields.audit_seq == entries[0]["seq"]
    assert fields.result_sha256 == entries[0]["result_sha256"]
    assert len(_on_disk(provider)) == 1  # the receipt wrote nothing more


def test_a_long_answer_opens_before_its_first_byte_and_ends_before_its_receipt(
    provider: Provider, homes: tuple[Member, Member]
) -> None:
    run = _run(provider, homes[1], LONG)
    pieces = run.pieces()
    next(pieces)
    assert [e["type"] for e in _on_disk(provider)] == ["opened"]
    list(pieces)
    assert [e["type"] for e in _on_disk(provider)] == ["opened"]
    fields, _ = run.receipt()
    opened, final = _on_disk(provider)
    assert (final["type"], final["outcome"], final["rows"]) == ("request", "answered", 40_000)
    assert final["opened_seq"] == opened["seq"] and fields.audit_seq == final["seq"]


def test_an_answer_opened_by_its_transport_is_not_opened_twice(
    provider: Provider, homes: tuple[Member, Member]
) -> None:
    for sql in (SMALL, LONG):
        run = _run(provider, homes[1], sql)
        provider.audit.opened(run.entry)  # as the Flight SQL port does before pieces()
        list(run.pieces())
        run.receipt()
    kinds = [e["type"] for e in _on_disk(provider)]
    assert kinds == ["opened", "request", "opened", "request"]


def test_a_piece_over_the_message_limit_is_refused_before_it_counts_as_sent(
    provider: Provider, homes: tuple[Member, Member]
) -> None:
    for sql in (SMALL, LONG):
        run = _run(provider, homes[1], sql)
        with pytest.raises(AnswerTooLarge, match="message limit"):
            next(run.pieces(None, max_piece_bytes=100))
        assert run.done  # the session and the slot are released
        assert _on_disk(provider) == []  # nothing on record as sent (the transport records it)


def _failing_fsync(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """fsync fails for the file called name (EIO), works for the others."""
    real_fsync = os.fsync

    def failing(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name == name:
            raise OSError(errno.EIO, "I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)


def test_an_answer_whose_entry_cannot_be_written_sends_nothing(
    provider: Provider, homes: tuple[Member, Member], monkeypatch: pytest.MonkeyPatch
) -> None:
    for sql in (SMALL, LONG):
        run = _run(provider, homes[1], sql)
        _failing_fsync(monkeypatch, "audit.jsonl")
        with pytest.raises(AuditUnavailable):
            next(run.pieces())
        monkeypatch.undo()
        assert run.done
        assert provider.audit.tick()  # the log recovers by itself
    entries = _on_disk(provider)
    assert [e["type"] for e in entries if e["type"] in ("request", "opened")] == []
    refused = [e["refused"] for e in entries if e["type"] == "outage"]
    assert refused == [{"supplier-a": 1}, {"supplier-a": 1}]


def test_an_answer_whose_claims_cannot_be_synced_sends_nothing(
    provider: Provider, homes: tuple[Member, Member], monkeypatch: pytest.MonkeyPatch
) -> None:
    for sql in (SMALL, LONG):
        run = _run(provider, homes[1], sql)
        _failing_fsync(monkeypatch, "quota.sqlite-wal")
        with pytest.raises(StateUnavailable, match="quota counts on disk"):
            next(run.pieces())
        monkeypatch.undo()
        assert run.done
    assert _on_disk(provider) == []  # neither answered nor opened: the transport records it


def test_the_claims_an_answer_is_sent_under_are_on_disk_before_it(
    provider: Provider, homes: tuple[Member, Member], monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording(fd: int) -> None:
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    ledger, log = "quota.sqlite-wal", "audit.jsonl"
    run = _run(provider, homes[1], SMALL)
    pieces = run.pieces()
    next(pieces)
    assert synced == [ledger, log]  # the query and its rows claimed: one fsync for both
    pieces.close()
    run.close()
    synced.clear()
    provider.batch_rows = 1000  # 40 pieces, each claimed before it is handed over
    pieces = _run(provider, homes[1], LONG).pieces()
    next(pieces)
    assert synced == [ledger, log]  # then the opened entry
    for _ in pieces:  # every further piece's rows are on disk before it is handed over
        assert provider.quotas.unsynced == 0
    assert synced.count(ledger) > 10


def test_what_a_transport_took_is_digested_at_each_piece_it_took(
    provider: Provider, homes: tuple[Member, Member], caplog: pytest.LogCaptureFixture
) -> None:
    run = _run(provider, homes[1], LONG)
    pieces = run.pieces()
    first, second = next(pieces), next(pieces)
    taken = len(first) + len(second)
    assert run.digest_of_first(taken) == hashlib.sha256(first + second).hexdigest()
    assert run.digest_of_first(0) == ""
    # A size that is no boundary of what was taken: the entry goes without a digest, said.
    assert run.digest_of_first(taken - 1) == ""
    assert "no digest of the first" in caplog.text
    pieces.close()
    assert run.done
