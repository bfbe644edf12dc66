"""The policy registry: reloads when files change or a policy's dates come due, not otherwise."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from connector import jws
from connector.policy.engine import DecisionRequest, EmbeddedEngine
from connector.policy.model import UsagePolicy
from connector.policy.registry import PolicyRegistry
from connector.policy.signing import VerdictStatus, sign_policy, signature_path


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


def test_a_policy_comes_into_force_and_expires_without_a_file_change(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    start, end = now + dt.timedelta(seconds=1), now + dt.timedelta(seconds=2.5)
    _signed_policy(tmp_path, key, _rfc3339(start), _rfc3339(end))
    registry = _registry(tmp_path, key)
    assert registry.snapshot.policies == ()
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
