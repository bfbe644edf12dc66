"""Scratch space of shaped copies: bounded in bytes, pruned when policies change, made anew
at start, against a real server over mutual TLS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from connector.config import load_settings
from connector.server import RunningServer, start_server
from tests.conftest import Member, connect, from_template, policy_text, write_defects_csv

PURPOSE = "quality-benchmarking"
EDITS = 8


def _homes(directory: Path, make: Callable[[str], Member]) -> list[Member]:
    """carmaker holding 60,000 rows of part_defects (shaped copies of some MiB), supplier-a."""
    provider, grantee = make("carmaker"), make("supplier-a")
    provider.ingest(write_defects_csv(directory / "d.csv", rows=60_000), "part_defects")
    return [provider, grantee]


def _copied_homes(tmp_path: Path, dataspace: Path) -> tuple[Member, Member]:
    """A copy of _homes for one test: the 60,000 rows are written and ingested once."""
    provider, grantee = from_template(tmp_path, dataspace, "shaped-scratch", _homes)
    return provider, grantee


def _reshaped(provider: Member, version: int) -> None:
    """Edit and re-sign policy q so that it filters rows differently (a new shaped copy)."""
    text = policy_text("q", members="[supplier-a]", version=version)
    provider.write_policy("q.yaml", text + f"rows: {{where: {{defects: {{gte: {version}}}}}}}\n")


def _scratch_bytes(provider: Member) -> int:
    path = load_settings(provider.home).shaped_copies
    wal = path.with_name(path.name + ".wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


@pytest.mark.slow
def test_reshaping_edits_and_a_restart_leave_the_scratch_file_small(
    tmp_path: Path,
    dataspace: Path,
    serve: Callable[[Member], RunningServer],
) -> None:
    provider, grantee = _copied_homes(tmp_path, dataspace)
    _reshaped(provider, 1)
    server = serve(provider)
    sizes, copies = [], []
    with connect(server, grantee) as peer:
        for version in range(1, EDITS + 1):
            if version > 1:
                _reshaped(provider, version)
                server.reload()
            result = peer.fetch("SELECT count(*) AS n FROM part_defects", PURPOSE)
            assert result.table.column("n")[0].as_py() > 0
            sizes.append(_scratch_bytes(provider))
            copies.append(len(server.provider.sandbox.shaped.names()))
    one_copy = sizes[0]
    # The copy of the withdrawn shaping goes as soon as no query reads it.
    assert copies == [1] * EDITS
    assert max(sizes) <= 3 * one_copy, sizes  # without pruning it grows to about 8 copies
    server.stop(grace=1)
    before = _scratch_bytes(provider)
    restarted = start_server(load_settings(provider.home), "127.0.0.1:0")
    try:
        assert _scratch_bytes(provider) < min(before, one_copy) // 4
        assert restarted.provider.sandbox.shaped.names() == []
    finally:
        restarted.stop(grace=1)


@pytest.mark.slow
def test_copies_are_bounded_in_bytes(
    tmp_path: Path,
    dataspace: Path,
    serve: Callable[[Member], RunningServer],
) -> None:
    provider, grantee = _copied_homes(tmp_path, dataspace)
    # Four grants with four shapings, all in force: none is unreachable.
    for k in range(4):
        text = policy_text(f"q{k}", members="[supplier-a]", purposes=f"[purpose-{k}]")
        provider.write_policy(f"q{k}.yaml", text + f"rows: {{where: {{defects: {{gte: {k}}}}}}}\n")
    config = provider.home / "connector.toml"
    config.write_text(
        config.read_text().replace(
            'shaped_copies_max_bytes = "1GiB"', 'shaped_copies_max_bytes = "1MiB"'
        )
    )
    server = serve(provider)
    shaped = server.provider.sandbox.shaped
    assert shaped.max_bytes == 1024**2
    with connect(server, grantee) as peer:
        for k in range(4):
            peer.fetch("SELECT count(*) FROM part_defects", f"purpose-{k}")
            # Each copy takes more than 1 MiB: only the latest is kept.
            assert len(shaped.names()) == 1 and shaped.total_bytes > 1024**2
        again = peer.fetch("SELECT count(*) AS n FROM part_defects", "purpose-3")
    assert again.table.column("n")[0].as_py() > 0 and len(shaped.names()) == 1
