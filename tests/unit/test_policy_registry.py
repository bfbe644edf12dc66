"""The policy registry: reloads when files change or a policy's dates come due, not otherwise."""

from __future__ import annotations

import datetime as dt
import json
import logging
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from connector import jws
from connector.policy.engine import DecisionRequest, EmbeddedEngine
from connector.policy.model import UsagePolicy
from connector.policy.registry import DenyingEngine, PolicyRegistry
from connector.policy.signing import VerdictStatus, sign_policy, signature_path
from connector.policy.versions import VersionMemory


def _signed_policy(folder: Path, key: ed25519.Ed25519PrivateKey, start: str, end: str) -> Path:
    path = folder / "p.yaml"
    path.write_text(
        "id: p\nversion: 1\ndescription: test\ndatasets: [part_defects]\n"
        "grantees: {members: [acme]}\npurposes: [quality]\n"
        f"valid: {{from: {start}, until: {end}}}\ncolumns: {{allow: [plant]}}\n"
    )
    sign_policy(path, key)
    return path


def _registry(folder: Path, key: ed25519.Ed25519PrivateKey) -> PolicyRegistry:
    trusted = {jws.key_id(key.public_key()): key.public_key()}
    return PolicyRegistry(folder, trusted, EmbeddedEngine)


def _rfc3339(moment: dt.datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def test_a_pending_policy_does_not_rebuild_the_engine_on_every_poll(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    _signed_policy(tmp_path, key, "2030-01-01", "2031-01-01")
    registry = _registry(tmp_path, key)
    (verdict,) = registry.snapshot.verdicts
    assert verdict.status is VerdictStatus.NOT_YET_VALID
    assert [registry.reload_if_changed() for _ in range(3)] == [False, False, False]


@pytest.mark.slow
def test_a_policy_comes_into_force_and_expires_without_a_file_change(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    start, end = now + dt.timedelta(seconds=1), now + dt.timedelta(seconds=2.5)
    _signed_policy(tmp_path, key, _rfc3339(start), _rfc3339(end))
    registry = _registry(tmp_path, key)
    assert not registry.snapshot.policies
    time.sleep(max(0.0, (start - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    assert registry.reload_if_changed()
    assert [p.id for p in registry.snapshot.policies] == ["p"]
    request = DecisionRequest(
        "acme", "quality", ("part_defects",), {}, False, dt.datetime.now(dt.UTC)
    )
    assert registry.snapshot.engine.decide(request).allow
    assert not registry.reload_if_changed()
    time.sleep(max(0.0, (end - dt.datetime.now(dt.UTC)).total_seconds()) + 0.05)
    assert registry.reload_if_changed()
    (verdict,) = registry.snapshot.verdicts
    assert verdict.status is VerdictStatus.EXPIRED


def _nested_header_signature(depth: int = 5000) -> str:
    header = jws.b64url(("[" * depth + "]" * depth).encode())
    return f"{header}..{jws.b64url(bytes(64))}\n"


def _decide(registry: PolicyRegistry) -> bool:
    request = DecisionRequest(
        "acme", "quality", ("part_defects",), {}, False, dt.datetime.now(dt.UTC)
    )
    return registry.snapshot.engine.decide(request).allow


def test_a_withdrawn_grant_is_gone_even_beside_a_nested_header_signature(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    granted = _signed_policy(tmp_path, key, "2020-01-01", "2099-01-01")
    registry = _registry(tmp_path, key)
    assert _decide(registry)
    other = tmp_path / "q.yaml"
    other.write_text(granted.read_text().replace("id: p", "id: q"))
    signature_path(other).write_text(_nested_header_signature())
    granted.unlink()
    signature_path(granted).unlink()
    assert registry.reload_if_changed()
    assert registry.snapshot.policies == ()
    assert not _decide(registry)
    (verdict,) = registry.snapshot.verdicts
    assert verdict.path == other
    assert verdict.status is VerdictStatus.MALFORMED


class _Broken(Exception):
    """Not a ConnectorError: stands for any bug below the registry."""


def test_any_failure_of_a_reload_denies_everything_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    _signed_policy(tmp_path, key, "2020-01-01", "2099-01-01")
    calls = []

    def factory(policies: Sequence[UsagePolicy]) -> EmbeddedEngine:
        calls.append(len(policies))
        if len(calls) > 1:
            raise _Broken("engine could not be built")
        return EmbeddedEngine(policies)

    registry = PolicyRegistry(tmp_path, {jws.key_id(key.public_key()): key.public_key()}, factory)
    assert _decide(registry)
    with caplog.at_level(logging.ERROR):
        registry.reload()
    assert registry.snapshot.policies == ()
    assert not _decide(registry)
    reasons = registry.snapshot.engine.decide(
        DecisionRequest("acme", "quality", ("part_defects",), {}, False, dt.datetime.now(dt.UTC))
    ).reasons
    assert "could not be loaded" in reasons[0]
    assert "denying everything until fixed: _Broken" in caplog.text
    (verdict,) = registry.snapshot.verdicts
    assert "_Broken" in verdict.message


def test_the_first_load_fails_closed_too(tmp_path: Path) -> None:
    def factory(policies: Sequence[UsagePolicy]) -> EmbeddedEngine:
        raise RecursionError("maximum recursion depth exceeded")

    registry = PolicyRegistry(tmp_path, {}, factory)
    assert registry.snapshot.policies == ()
    assert not _decide(registry)


def _versioned(folder: Path, key: ed25519.Ed25519PrivateKey, version: int, **kw: str) -> Path:
    """Policy p at a version, granting plant (and, before version 2, part_no)."""
    columns = "[plant, part_no]" if version < 2 else "[plant]"
    start, end = kw.get("start", "2020-01-01"), kw.get("end", "2099-01-01")
    path = folder / kw.get("name", "p.yaml")
    path.write_text(
        f"id: p\nversion: {version}\ndescription: {kw.get('description', 'test')}\n"
        "datasets: [part_defects]\ngrantees: {members: [acme]}\npurposes: [quality]\n"
        f"valid: {{from: {start}, until: {end}}}\ncolumns: {{allow: {columns}}}\n"
    )
    sign_policy(path, key)
    return path


def _durable_registry(folder: Path, key: ed25519.Ed25519PrivateKey, memory: Path) -> PolicyRegistry:
    trusted = {jws.key_id(key.public_key()): key.public_key()}
    return PolicyRegistry(folder, trusted, EmbeddedEngine, VersionMemory(memory))


def _status(registry: PolicyRegistry, name: str) -> VerdictStatus:
    return next(v.status for v in registry.snapshot.verdicts if v.path.name == name)


def test_a_rolled_back_version_is_refused_also_after_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    folder, memory = tmp_path / "policies", tmp_path / "state" / "versions.json"
    folder.mkdir()
    old = _versioned(folder, key, 1)
    old_bytes, old_signature = old.read_bytes(), signature_path(old).read_bytes()
    registry = _durable_registry(folder, key, memory)
    assert [p.version for p in registry.snapshot.policies] == [1]
    _versioned(folder, key, 2)
    registry.reload()
    assert [p.version for p in registry.snapshot.policies] == [2]
    assert json.loads(memory.read_text())["policies"]["p"]["version"] == 2
    old.write_bytes(old_bytes)
    signature_path(old).write_bytes(old_signature)
    with caplog.at_level(logging.ERROR):
        registry.reload()
    assert registry.snapshot.policies == ()
    assert _status(registry, "p.yaml") is VerdictStatus.ROLLED_BACK
    assert "rolled back: version 1 is older than version 2 already in force" in caplog.text
    restarted = _durable_registry(folder, key, memory)
    assert restarted.snapshot.policies == ()
    assert _status(restarted, "p.yaml") is VerdictStatus.ROLLED_BACK


def test_an_expired_version_is_still_remembered(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    memory = tmp_path / "versions.json"
    folder = tmp_path / "policies"
    folder.mkdir()
    _versioned(folder, key, 2)
    _durable_registry(folder, key, memory)
    _versioned(folder, key, 2, end="2021-01-01")  # re-signed as expired: reused version
    _versioned(folder, key, 1)  # and the old, unexpired version 1 copied back
    registry = _durable_registry(folder, key, memory)
    assert registry.snapshot.policies == ()
    assert _status(registry, "p.yaml") is VerdictStatus.ROLLED_BACK


def test_the_same_version_with_other_content_is_refused(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    folder, memory = tmp_path / "policies", tmp_path / "versions.json"
    folder.mkdir()
    _versioned(folder, key, 2)
    registry = _durable_registry(folder, key, memory)
    assert [p.version for p in registry.snapshot.policies] == [2]
    _versioned(folder, key, 2, description="changed")
    registry.reload()
    assert not registry.snapshot.policies
    (verdict,) = registry.snapshot.verdicts
    assert verdict.status is VerdictStatus.VERSION_REUSED
    assert "set `version: 3`" in verdict.message
    _versioned(folder, key, 2)  # the bytes that were in force: accepted again
    registry.reload()
    assert [p.version for p in registry.snapshot.policies] == [2]


def test_a_higher_version_beside_the_old_one_supersedes_it_without_a_gap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    folder = tmp_path / "policies"
    folder.mkdir()
    _versioned(folder, key, 1)
    _versioned(folder, key, 2, name="p.v2.yaml", start="2090-01-01")
    with caplog.at_level(logging.WARNING):
        registry = _durable_registry(folder, key, tmp_path / "v.json")
    assert [p.version for p in registry.snapshot.policies] == [1]
    assert "version 2 is valid only from 2090-01-01" in caplog.text
    assert "version 1 stays in force until then" in caplog.text
    _versioned(folder, key, 2, name="p.v2.yaml")
    registry.reload()
    assert [p.version for p in registry.snapshot.policies] == [2]
    registry.reload()
    assert _status(registry, "p.yaml") is VerdictStatus.SUPERSEDED
    (folder / "p.v2.yaml").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _versioned(folder, key, 3, name="p.v3.yaml", start="2090-01-01")
        registry.reload()
    assert "until then no version of p is in force" in caplog.text


def test_two_files_with_the_same_highest_version_are_both_refused(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    folder = tmp_path / "policies"
    folder.mkdir()
    _versioned(folder, key, 1)
    _versioned(folder, key, 2, name="a.yaml")
    _versioned(folder, key, 2, name="b.yaml", description="other")
    registry = _durable_registry(folder, key, tmp_path / "v.json")
    assert registry.snapshot.policies == ()
    assert [_status(registry, n) for n in ("a.yaml", "b.yaml", "p.yaml")] == [
        VerdictStatus.DUPLICATE,
        VerdictStatus.DUPLICATE,
        VerdictStatus.SUPERSEDED,
    ]


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b'{"format": 1}',
        b'{"format": 9, "policies": {}}',
        b'{"format": 1, "policies": {"p": {"version": true, "sha256": "00"}}}',
        b'{"format": 1, "policies": {"p": {"version": 0, "sha256": "' + b"0" * 64 + b'"}}}',
    ],
)
def test_an_unreadable_version_record_denies_everything(tmp_path: Path, content: bytes) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    folder = tmp_path / "policies"
    folder.mkdir()
    _versioned(folder, key, 1)
    memory = tmp_path / "versions.json"
    memory.write_bytes(content)
    registry = _durable_registry(folder, key, memory)
    assert registry.snapshot.policies == ()
    assert isinstance(registry.snapshot.engine, DenyingEngine)
    assert "record of policy versions in force" in registry.snapshot.verdicts[0].message


def test_a_version_that_cannot_be_recorded_is_not_put_in_force(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    folder = tmp_path / "policies"
    folder.mkdir()
    _versioned(folder, key, 1)
    memory = tmp_path / "state" / "versions.json"
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, limits[1]))  # a full disk, as root sees one
    try:
        registry = _durable_registry(folder, key, memory)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert not registry.snapshot.policies
    assert "cannot record the policy versions" in registry.snapshot.verdicts[0].message
    assert not memory.exists()
    assert list(memory.parent.iterdir()) == []  # no temporary file left behind
    registry.reload()
    assert [p.version for p in registry.snapshot.policies] == [1]
    assert json.loads(memory.read_text())["policies"]["p"]["version"] == 1
