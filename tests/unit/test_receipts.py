"""Receipts are JWS any JOSE library can check; tampering and other algorithms are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from connector import jws
from connector.canonical import canonical_bytes
from connector.policy.ref import policy_refs
from connector.receipt import ReceiptFields, ReceiptSigner, verify_receipt


def _fields() -> ReceiptFields:
    return ReceiptFields(
        request_id="r1",
        member_id="acme",
        provider_id="bmw",
        purpose="quality",
        query_sha256="a" * 64,
        result_sha256="b" * 64,
        rows=3,
        bytes=100,
        truncated=False,
        policies=policy_refs([("p", 2), ("p", 2), ("o", 1)]),
    )


def test_receipt_round_trip() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    token = ReceiptSigner(key).sign(_fields())
    fields = verify_receipt(token, key.public_key())
    assert fields.request_id == "r1" and fields.rows == 3
    assert [(p.id, p.version) for p in fields.policies] == [("o", 1), ("p", 2)]
    header = json.loads(jws.b64url_decode(token.split(".")[0]))
    assert header == {"alg": "EdDSA", "kid": jws.key_id(key.public_key())}


def test_changed_receipt_does_not_verify() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    head, body, sig = ReceiptSigner(key).sign(_fields()).split(".")
    payload = json.loads(jws.b64url_decode(body))
    payload["rows"] = 3000
    forged = ".".join([head, jws.b64url(json.dumps(payload).encode()), sig])
    with pytest.raises(jws.JwsError, match="does not match"):
        verify_receipt(forged, key.public_key())


@pytest.mark.parametrize("alg", ["none", "HS256", "RS256"])
def test_other_algorithms_are_refused(alg: str) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    _, body, sig = ReceiptSigner(key).sign(_fields()).split(".")
    head = jws.b64url(json.dumps({"alg": alg, "kid": "x"}).encode())
    with pytest.raises(jws.JwsError, match="algorithm"):
        verify_receipt(f"{head}.{body}.{sig}", key.public_key())


def test_another_key_does_not_verify() -> None:
    token = ReceiptSigner(ed25519.Ed25519PrivateKey.generate()).sign(_fields())
    with pytest.raises(jws.JwsError):
        verify_receipt(token, ed25519.Ed25519PrivateKey.generate().public_key())


def test_the_signed_payload_is_the_canonical_json_of_every_field() -> None:
    fields = dataclasses.replace(
        _fields(),
        audit_seq=7,
        obligations={"attribution": "Source: ACME", "delete_within_days": 90, "x": [1, {"b": 2}]},
        limited_by="max_rows",
        client_reference="mine-1",
        versions={"parts": [0, 3]},
    )
    # The payload holds exactly the dataclass's fields, as dataclasses.asdict gives them.
    assert fields.to_json() == canonical_bytes(dataclasses.asdict(fields))
    key = ed25519.Ed25519PrivateKey.generate()
    token = ReceiptSigner(key).sign(fields)
    assert jws.b64url_decode(token.split(".")[1]) == fields.to_json()
    assert verify_receipt(token, key.public_key()) == fields
