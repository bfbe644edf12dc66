"""Fuzz JWS verification: a mutated token raises JwsError, or is the very token signed."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given
from hypothesis import strategies as st

from connector import jws, receipt
from tests.fuzz.mutation import mutated

KEY = ed25519.Ed25519PrivateKey.generate()
PAYLOAD = json.dumps({"a": [1, {"b": "c"}], "n": 3}).encode()
TOKEN = jws.sign(PAYLOAD, KEY, detached=False)
DETACHED = jws.sign(PAYLOAD, KEY, detached=True)
B64 = ["A", "B", "Q", "g", "w", "_", "-", "=", ".", "..", "eyJ", "e30", "W10", "\n", " "]


def _header(draw_json: object) -> str:
    return jws.b64url(json.dumps(draw_json).encode())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=20,
)


@pytest.mark.slow
@given(st.one_of(mutated(TOKEN, B64), mutated(DETACHED, B64)))
def test_a_mutated_token_raises_jws_error_or_is_the_signed_token(token: str) -> None:
    for detached in (None, PAYLOAD):
        try:
            verified = jws.verify(token, KEY.public_key(), detached_payload=detached)
        except jws.JwsError:
            continue
        assert token.strip() in (TOKEN, DETACHED)
        assert verified.payload == PAYLOAD


@given(json_values, st.integers(0, 5000))
def test_any_header_json_raises_jws_error(header: object, depth: int) -> None:
    signature = TOKEN.split(".")[2]
    for part in (_header(header), jws.b64url(("[" * depth + "]" * depth).encode())):
        try:
            jws.verify(f"{part}.{TOKEN.split('.')[1]}.{signature}", KEY.public_key())
        except jws.JwsError:
            continue
        raise AssertionError("a header that was never signed verified")


@given(mutated(TOKEN, B64))
def test_a_mutated_receipt_raises_jws_error(token: str) -> None:
    try:
        receipt.verify_receipt(token, KEY.public_key())
    except jws.JwsError:
        return
    raise AssertionError("the payload is not a receipt, so it cannot verify as one")
