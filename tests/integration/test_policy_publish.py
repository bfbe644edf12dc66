"""Publishing new policy versions while a member queries: no query is refused in between."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from connector.errors import ConnectorError
from connector.server import RunningServer
from tests.conftest import Member, connect, policy_text, run_cli, wait_for, write_defects_csv

PURPOSE = "quality-benchmarking"
VERSIONS = 12


def _draft(folder: Path, version: int, start: str | None = None) -> Path:
    path = folder / "q.yaml"
    end = "2091-01-01" if start else None
    text = policy_text(
        "q", members="[supplier-a]", version=version, valid_from=start, valid_until=end
    )
    path.write_text(text)
    return path


@pytest.mark.slow
def test_publishing_and_re_signing_never_withdraw_the_grant(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
    capsys: pytest.CaptureFixture[str],
) -> None:
    provider, grantee = make_member("carmaker"), make_member("supplier-a")
    config = provider.home / "connector.toml"
    config.write_text(config.read_text().replace("reload_seconds = 2", "reload_seconds = 0.1"))
    provider.ingest(write_defects_csv(tmp_path / "d.csv"), "part_defects")
    drafts = tmp_path / "drafts"
    drafts.mkdir()
    assert run_cli("policy", "publish", "--home", provider.home, _draft(drafts, 1)) == 0
    server = serve(provider)
    stop, answered, refused = threading.Event(), [0], []

    def query_in_a_loop() -> None:
        with connect(server, grantee) as peer:
            while not stop.is_set():
                try:
                    peer.query("SELECT plant, defects FROM part_defects LIMIT 3", PURPOSE)
                    answered[0] += 1
                except ConnectorError as exc:
                    refused.append(str(exc))

    def reload_in_a_loop() -> None:  # besides the 0.1 s poll: reloads at every moment
        while not stop.is_set():
            server.provider.policies.reload()

    workers = [threading.Thread(target=f) for f in (query_in_a_loop, reload_in_a_loop)]
    for worker in workers:
        worker.start()
    try:
        for version in range(2, VERSIONS + 1):
            assert (
                run_cli("policy", "publish", "--home", provider.home, _draft(drafts, version)) == 0
            )
            published = provider.home / "policies" / f"q.v{version}.yaml"
            assert run_cli("policy", "sign", "--home", provider.home, published) == 0
            wait_for(_in_force(server, version))
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    assert refused == []
    assert answered[0] > VERSIONS
    names = sorted(p.name for p in (provider.home / "policies").iterdir())
    assert names == [f"q.v{VERSIONS}.yaml", f"q.v{VERSIONS}.yaml.jws", "superseded"]
    assert len(list((provider.home / "policies" / "superseded").iterdir())) == 2 * (VERSIONS - 1)


def test_a_pending_version_leaves_the_old_one_in_force_and_old_ones_are_refused(
    tmp_path: Path, make_member: Callable[[str], Member], capsys: pytest.CaptureFixture[str]
) -> None:
    provider = make_member("carmaker")
    drafts = tmp_path / "drafts"
    drafts.mkdir()
    home = provider.home
    assert run_cli("policy", "publish", "--home", home, _draft(drafts, 1)) == 0
    capsys.readouterr()
    assert run_cli("policy", "publish", "--home", home, _draft(drafts, 2, "2090-01-01")) == 0
    out = capsys.readouterr().out
    assert "valid only from 2090-01-01" in out
    assert "until then q.v1.yaml (version 1) stays in force" in out
    assert (home / "policies" / "q.v1.yaml").exists()
    # A lower or equal version with other content is refused before anything moves.
    assert run_cli("policy", "publish", "--home", home, _draft(drafts, 1)) == 0  # identical
    text = _draft(drafts, 2).read_text().replace("Test policy", "Changed policy")
    (drafts / "q.yaml").write_text(text)
    assert run_cli("policy", "publish", "--home", home, drafts / "q.yaml") == 1
    assert "already holds version 2" in capsys.readouterr().err
    (home / "policies" / "inside.yaml").write_text(text)
    assert run_cli("policy", "publish", "--home", home, home / "policies" / "inside.yaml") == 1
    assert "keep drafts elsewhere" in capsys.readouterr().err


def _in_force(server: RunningServer, version: int) -> Callable[[], bool]:
    """True once version is the one policy version the server has in force."""
    policies = server.provider.policies
    return lambda: [p.version for p in policies.snapshot.policies] == [version]
