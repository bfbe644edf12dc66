"""The policy registry: reloads when files change or a policy's dates come due, not otherwise."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from connector import jws
from connector.policy.engine import DecisionRequest, EmbeddedEngine
from connector.policy.registry import PolicyRegistry
from connector.policy.signing import VerdictStatus, sign_policy


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
