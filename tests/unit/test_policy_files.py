"""Policy files: strict parsing with file and line; signatures and every verdict."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from connector import jws
from connector.errors import PolicyError
from connector.policy.model import parse_policy
from connector.policy.signing import (
    VerdictStatus,
    load_policy_dir,
    sign_policy,
    signature_path,
    verify_policy,
)

GOOD = """\
id: acme-quality
version: 3
description: Weekly defect figures
datasets: [Part_Defects]
grantees: {members: [acme-gmbh]}
purposes: [quality-benchmarking]
valid: {from: 2026-01-01, until: 2027-01-01}
columns:
  allow: [plant, Defects]
"""
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)


def _write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_good_policy_is_normalised(tmp_path: Path) -> None:
    policy = parse_policy(_write(tmp_path, GOOD))
    assert (policy.id, policy.version) == ("acme-quality", 3)
    assert policy.datasets == ("part_defects",)
    assert policy.columns_allow == ("plant", "defects")
    assert policy.valid_from == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert policy.as_rego_data()["valid_until_ns"] == 1798761600 * 10**9
    assert policy.shaping.is_plain


def test_masks_row_filters_and_aggregate_only_are_read(tmp_path: Path) -> None:
    text = GOOD.replace("  allow:", "  mask: {Part_No: hash, price: null}\n  allow:") + (
        'rows:\n  where:\n    plant: [Regensburg, "O\'Hare"]\n'
        "    week: {gte: 2026-03-01, lt: 2026-06-01}\n"
        "    defects: {gt: 0.5}\n"
        "aggregate_only: {min_group_size: 5}\n"
    )
    policy = parse_policy(_write(tmp_path, text))
    assert policy.shaping.masks == (("part_no", "hash"), ("price", "null"))
    assert policy.columns == ("plant", "defects", "part_no", "price")
    assert policy.shaping.min_group_size == 5
    assert policy.shaping.where_sql() == (
        "(\"plant\" IN ('Regensburg', 'O''Hare')) AND "
        "(\"week\" >= DATE '2026-03-01' AND \"week\" < DATE '2026-06-01') AND "
        '("defects" > 0.5)'
    )
    assert policy.as_rego_data()["columns"] == ["plant", "defects", "part_no", "price"]


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        (GOOD + "rows: {filter: {plant: [x]}}\n", 10, "unknown key 'filter' in rows"),
        (GOOD + "rows: {where: {plant: []}}\n", 10, "must list 1 to 1000 values"),
        (GOOD + "rows: {where: {plant: x}}\n", 10, "a list of values or a mapping of bounds"),
        (GOOD + "rows: {where: {week: {gte: 1, gt: 2}}}\n", 10, "one lower bound"),
        (GOOD + "rows: {where: {week: {between: 1}}}\n", 10, "unknown key 'between'"),
        (GOOD + "rows: {where: {week: {lt: .nan}}}\n", 10, "finite number"),
        (GOOD + "rows: {where: {week: [2026-01-01T08:00:00]}}\n", 10, "time zone"),
        (GOOD + "rows: {where: {week: [null]}}\n", 10, "text, a number"),
        (GOOD + "rows: {where: {'a b': [1]}}\n", 10, "not allowed here"),
        (GOOD + "rows: {where: {plant: [1], PLANT: [2]}}\n", 10, "appears twice"),
        (GOOD.replace("  allow:", "  mask: {price: sha1}\n  allow:"), 9, "hash, redact, null"),
        (GOOD.replace("  allow:", "  mask: {plant: hash}\n  allow:"), 9, "both allowed"),
        (GOOD.replace("  allow:", "  mask: {}\n  allow:"), 9, "must map columns"),
        (GOOD + "aggregate_only: {min_group_size: 1}\n", 10, "from 2 to 1000000"),
        (GOOD + "aggregate_only: {}\n", 10, "needs min_group_size"),
        (GOOD + "aggregate_only: {k: 5}\n", 10, "unknown key 'k' in aggregate_only"),
        (GOOD + "limits: {queries_per_day: 0}\n", 10, "limits.queries_per_day must be"),
        (GOOD + "limits: {max_rows: 5}\n", 10, "unknown key 'max_rows' in limits"),
        (GOOD + "obligations: {delete_within_days: 0}\n", 10, "at least 1"),
        (GOOD + "obligations: {pay: 5}\n", 10, "unknown key 'pay' in obligations"),
        (GOOD + "id: other\n", 10, "key 'id' appears twice"),
        (GOOD.replace("version: 3", "version: three"), 2, "version must be a whole number"),
        (GOOD.replace("version: 3", "version: 0"), 2, "version must be a whole number"),
        (GOOD.replace("until: 2027-01-01", "until: 2025-01-01"), 7, "later than valid.from"),
        (GOOD.replace("[plant, Defects]", "[plant, 'x; drop']"), 9, "not allowed here"),
        (GOOD.replace("[acme-gmbh]", "[]"), 5, "non-empty list"),
        (GOOD.replace("id: acme-quality", "id: Bad Id!"), 1, "id 'Bad Id!' is not allowed"),
        (GOOD.replace("version: 3", "format: 2\nversion: 3"), 2, "newer connector"),
        ("id: [unclosed\n", 2, "not valid YAML"),
        ("id: x\n", 1, "missing key(s): version"),
        (
            GOOD.replace("purposes: [quality-benchmarking]", "purposes: !!binary aGVsbG8="),
            6,
            "non-empty list",
        ),
        (GOOD.replace("from: 2026-01-01", "from: 2026-01-01T08:00:00"), 7, "needs a time zone"),
        (GOOD.replace("[Part_Defects]", "[_connector]"), 4, "a dataset name"),
        (GOOD.replace("figures", 'figures\\e[2J"').replace("Weekly", '"Weekly'), 3, "control"),
        (GOOD.replace("[plant, Defects]", '[plant, "\\u212a"]'), 9, "not allowed here"),
        (GOOD + "<<: {rows: 1}\n", 10, "unknown key '<<'"),
    ],
)
def test_bad_policies_name_file_line_and_problem(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(PolicyError) as failed:
        parse_policy(path)
    assert f"{path}:{line}:" in str(failed.value)
    assert words in str(failed.value)


def _keys() -> tuple[ed25519.Ed25519PrivateKey, dict[str, ed25519.Ed25519PublicKey]]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, {jws.key_id(key.public_key()): key.public_key()}


def test_signed_policy_is_valid_and_signature_is_standard_detached_jws(tmp_path: Path) -> None:
    key, trusted = _keys()
    path = _write(tmp_path, GOOD)
    sign_policy(path, key)
    verdict = verify_policy(path, trusted, NOW)
    assert verdict.status is VerdictStatus.VALID
    header, payload, _ = signature_path(path).read_text().strip().split(".")
    assert payload == ""
    assert json.loads(jws.b64url_decode(header))["alg"] == "EdDSA"


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ("unsigned", VerdictStatus.UNSIGNED, "connector policy sign"),
        ("tampered", VerdictStatus.MODIFIED, "changed after it was signed"),
        ("unknown", VerdictStatus.UNKNOWN_SIGNER, "not among this connector's trusted signers"),
        ("garbage", VerdictStatus.MALFORMED, "malformed"),
        ("alg-none", VerdictStatus.MALFORMED, "algorithm must be EdDSA"),
        ("alg-hs256", VerdictStatus.MALFORMED, "algorithm must be EdDSA"),
        ("one-byte", VerdictStatus.MODIFIED, "changed after it was signed"),
        ("kid-of-trusted-other-key", VerdictStatus.MODIFIED, "sign it again"),
        ("junk-in-signature", VerdictStatus.MALFORMED, "not base64url"),
        ("huge-signature", VerdictStatus.MALFORMED, "larger than"),
    ],
)
def test_each_bad_signature_has_its_own_verdict(
    tmp_path: Path, change: str, status: VerdictStatus, words: str
) -> None:
    key, trusted = _keys()
    path = _write(tmp_path, GOOD)
    sign_policy(path, key)
    sig = signature_path(path)
    if change == "unsigned":
        sig.unlink()
    elif change == "tampered":
        path.write_bytes(path.read_bytes().replace(b"acme-gmbh", b"acme-gmbx"))
    elif change == "unknown":
        _, trusted = _keys()
    elif change == "garbage":
        sig.write_text("not a jws")
    elif change == "alg-none":
        _, body, signature = sig.read_text().strip().split(".")
        sig.write_text(jws.b64url(b'{"alg":"none","kid":"x"}') + f".{body}.{signature}")
    elif change == "alg-hs256":
        # Algorithm confusion: an HMAC keyed with the trusted public key's bytes.
        kid = jws.key_id(key.public_key())
        header = jws.b64url(json.dumps({"alg": "HS256", "kid": kid}).encode())
        secret = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        signing_input = f"{header}.{jws.b64url(path.read_bytes())}".encode()
        mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
        sig.write_text(f"{header}..{jws.b64url(mac)}")
    elif change == "one-byte":
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01  # one bit of one column name
        path.write_bytes(bytes(data))
    elif change == "kid-of-trusted-other-key":
        # Signed by an untrusted key that claims the trusted key's id: cannot be told
        # from a changed file, and must never verify.
        header = jws.b64url(
            json.dumps({"alg": "EdDSA", "kid": jws.key_id(key.public_key())}).encode()
        )
        forger = ed25519.Ed25519PrivateKey.generate()
        signature = forger.sign(f"{header}.{jws.b64url(path.read_bytes())}".encode())
        sig.write_text(f"{header}..{jws.b64url(signature)}")
    elif change == "junk-in-signature":
        header, body, signature = sig.read_text().strip().split(".")
        sig.write_text(f"{header}.{body}.{signature[:8]}*!*!{signature[8:]}")
    elif change == "huge-signature":
        sig.write_text("A" * (64 * 1024))
    verdict = verify_policy(path, trusted, NOW)
    assert verdict.status is status
    assert words in verdict.message


def test_signed_but_malformed_policy_is_malformed_with_line(tmp_path: Path) -> None:
    key, trusted = _keys()
    path = _write(tmp_path, GOOD)
    sign_policy(path, key)
    path.write_text(GOOD + "rows: {}\n")
    signature_path(path).write_text(jws.sign(path.read_bytes(), key, detached=True))
    verdict = verify_policy(path, trusted, NOW)
    assert verdict.status is VerdictStatus.MALFORMED
    assert ":10:" in verdict.message


def test_sign_refuses_a_malformed_policy(tmp_path: Path) -> None:
    key, _ = _keys()
    with pytest.raises(PolicyError, match="unknown key"):
        sign_policy(_write(tmp_path, GOOD + "rows: {where: {plant: [x]}, extra: 1}\n"), key)


@pytest.mark.parametrize(
    ("now", "status"),
    [
        (dt.datetime(2025, 12, 31, 23, 59, tzinfo=dt.UTC), VerdictStatus.NOT_YET_VALID),
        (dt.datetime(2027, 1, 1, tzinfo=dt.UTC), VerdictStatus.EXPIRED),
    ],
)
def test_dates_are_checked(tmp_path: Path, now: dt.datetime, status: VerdictStatus) -> None:
    key, trusted = _keys()
    path = _write(tmp_path, GOOD)
    sign_policy(path, key)
    assert verify_policy(path, trusted, now).status is status


def test_folder_loads_only_valid_policies_and_refuses_duplicate_ids(tmp_path: Path) -> None:
    key, trusted = _keys()
    for name in ("a.yaml", "b.yaml"):
        sign_policy(_write(tmp_path, GOOD, name), key)
    sign_policy(_write(tmp_path, GOOD.replace("acme-quality", "other"), "c.yaml"), key)
    _write(tmp_path, GOOD.replace("acme-quality", "unsigned"), "d.yml")
    policies, verdicts = load_policy_dir(tmp_path, trusted, NOW)
    assert [p.id for p in policies] == ["other"]
    statuses = {v.path.name: v.status for v in verdicts}
    assert statuses == {
        "a.yaml": VerdictStatus.DUPLICATE,
        "b.yaml": VerdictStatus.DUPLICATE,
        "c.yaml": VerdictStatus.VALID,
        "d.yml": VerdictStatus.UNSIGNED,
    }


def test_an_oversized_policy_is_refused_before_its_signature_is_checked(tmp_path: Path) -> None:
    key, trusted = _keys()
    path = _write(tmp_path, GOOD)
    sign_policy(path, key)
    path.write_text(GOOD + "#" * (2 * 1024 * 1024))
    verdict = verify_policy(path, trusted, NOW)
    assert verdict.status is VerdictStatus.MALFORMED
    assert "larger than 1048576 bytes" in verdict.message
