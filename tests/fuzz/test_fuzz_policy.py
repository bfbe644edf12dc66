"""Fuzz policy files and their signatures: only PolicyError or a verdict, never a crash."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from connector import jws
from connector.errors import PolicyError
from connector.policy.model import parse_policy
from connector.policy.signing import VerdictStatus, signature_path, verify_policy
from tests.fuzz.mutation import mutated

SEED = """\
id: acme-quality
version: 3
description: Weekly defect figures
datasets: [part_defects]
grantees: {members: [acme-gmbh]}
purposes: [quality-benchmarking]
valid: {from: 2026-01-01, until: 2027-01-01T00:00:00Z}
columns:
  allow: [plant, defects]
  mask: {part_no: hash, price: null}
rows:
  where:
    plant: [Regensburg, 'Leipzig']
    week: {gte: 2026-03-01, lt: 2026-06-01}
    defects: {gt: 0.5}
aggregate_only: {min_group_size: 5}
limits: {max_rows_per_query: 100, queries_per_day: 10, rows_per_day: 1000}
obligations: {delete_within_days: 30, attribution: "Data: ACME", terms: [no resale]}
"""
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
KEY = ed25519.Ed25519PrivateKey.generate()
TRUSTED = {jws.key_id(KEY.public_key()): KEY.public_key()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every example: a module-scoped fixture, as hypothesis asks."""
    return tmp_path_factory.mktemp("fuzz-policy")


@given(text=mutated(SEED))
def test_a_mutated_policy_is_read_or_refused_with_a_policy_error(folder: Path, text: str) -> None:
    path = folder / "p.yaml"
    data = text.encode("utf-8", errors="surrogatepass")
    try:
        policy = parse_policy(path, data)
    except PolicyError as exc:
        assert exc.path == str(path)
        return
    assert policy.version >= 1
    assert policy.valid_until > policy.valid_from


@given(
    text=mutated(SEED),
    how=st.sampled_from(["keep", "mutate", "nested", "garbage"]),
    data=st.data(),
)
def test_a_mutated_policy_or_signature_gets_a_verdict(
    folder: Path, text: str, how: str, data: st.DataObject
) -> None:
    path = folder / "v.yaml"
    body = text.encode("utf-8", errors="surrogatepass")
    path.write_bytes(body)
    token = jws.sign(body, KEY, detached=True)
    if how == "mutate":
        token = data.draw(mutated(token, ["..", "=", "A", "_", "-", "eyJ"]))
    elif how == "nested":
        depth = data.draw(st.integers(1, 6000))
        token = jws.b64url(("[" * depth + "]" * depth).encode()) + ".." + token.split(".")[2]
    elif how == "garbage":
        token = data.draw(st.text(max_size=200))
    signature_path(path).write_text(token, encoding="utf-8", errors="surrogatepass")
    verdict = verify_policy(path, TRUSTED, NOW)
    assert isinstance(verdict.status, VerdictStatus)
    if verdict.status is VerdictStatus.VALID:
        assert how == "keep" or token.strip() == jws.sign(body, KEY, detached=True)
