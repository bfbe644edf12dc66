"""JSON Web Signatures (RFC 7515), compact form: EdDSA (Ed25519) for policies, receipts and
audit checkpoints; ES256 (P-256) only for the endorsement a member's TLS key gives its
receipt key.

Each verifier accepts exactly one algorithm: no `none`, no HMAC, no algorithm chosen by the
signed data itself. Key ids are RFC 7638 JWK thumbprints, so any JOSE library agrees on them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from connector.canonical import canonical_bytes, canonical_json

ALGORITHM = "EdDSA"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
# JOSE headers and the connector's claims are a few levels deep; Python's json recurses once
# per level, so 5,000 nested brackets raised RecursionError out of every verifier.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


class JwsError(ValueError):
    """A JWS is malformed, uses another algorithm, or its signature does not verify."""


class SignatureMismatch(JwsError):
    """A well-formed JWS whose signature does not match the signed bytes and key."""


@dataclass(frozen=True)
class VerifiedJws:
    """A JWS whose signature checked out: its header and payload bytes."""

    header: Mapping[str, Any]
    payload: bytes


def b64url(data: bytes) -> str:
    """Base64url without padding, as JOSE writes it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Inverse of b64url; JwsError on anything that is not strict base64url."""
    # Strict alphabet: Python's decoder would silently drop other characters.
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise JwsError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise JwsError("not base64url") from None
    # Canonical only: the unused low bits of the last character must be zero, so that one
    # signature has exactly one spelling (RFC 4648 section 3.5).
    if b64url(data) != text:
        raise JwsError("not canonical base64url (unused bits set in the last character)")
    return data


def parse_json(data: bytes | str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """json.loads with the nesting bounded first; JwsError when it is not JSON or too deep."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError:
        raise JwsError("not UTF-8 JSON") from None
    depth = 0
    for bracket in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > max_depth:
            raise JwsError(f"JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        raise JwsError("not JSON") from None


def key_id(public_key: ed25519.Ed25519PublicKey) -> str:
    """RFC 7638 thumbprint of the key as an OKP JWK, base64url."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    jwk = canonical_json({"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)})
    return b64url(hashlib.sha256(jwk.encode()).digest())


def sign(
    payload: bytes, key: ed25519.Ed25519PrivateKey, *, detached: bool, kid: str | None = None
) -> str:
    """Compact JWS over payload; with detached=True the payload part is left empty. kid:
    the key's id when the caller holds it (key_id of its public key)."""
    header = {"alg": ALGORITHM, "kid": kid or key_id(key.public_key())}
    protected = b64url(canonical_bytes(header))
    body = b64url(payload)
    signature = b64url(key.sign(f"{protected}.{body}".encode("ascii")))
    return f"{protected}.{'' if detached else body}.{signature}"


def sign_es256(payload: bytes, key: ec.EllipticCurvePrivateKey, *, detached: bool = False) -> str:
    """Compact JWS (ES256) over payload with a P-256 key, such as a member's TLS key or the
    data space's CA key; with detached=True the payload part is left empty."""
    protected = b64url(canonical_bytes({"alg": "ES256"}))
    signing_input = f"{protected}.{b64url(payload)}".encode("ascii")
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    body = "" if detached else b64url(payload)
    return f"{protected}.{body}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def verify_es256(
    token: str, key: ec.EllipticCurvePublicKey, *, detached_payload: bytes | None = None
) -> bytes:
    """Check a compact ES256 JWS with a P-256 public key; returns the payload. Pass
    detached_payload for a detached signature (its payload part must then be empty)."""
    parts, _ = _split(token, "ES256")
    if detached_payload is not None:
        if parts[1]:
            raise JwsError("expected a detached JWS (empty payload part)")
        parts[1] = b64url(detached_payload)
    raw = b64url_decode(parts[2])
    if len(raw) != 64:
        raise JwsError("an ES256 signature is 64 bytes")
    signature = encode_dss_signature(
        int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    )
    try:
        key.verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureMismatch("the signature does not match") from None
    return b64url_decode(parts[1])


def _split(token: str, algorithm: str) -> tuple[list[str], dict[str, Any]]:
    """The three parts of a compact JWS and its header, which must name `algorithm`."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwsError("a compact JWS has three parts separated by '.'")
    if not all(_B64URL.fullmatch(part) for part in parts):
        # Checked here for all three: the signing input is re-encoded as ASCII below.
        raise JwsError("not base64url: a compact JWS holds only base64url characters and two '.'")
    try:
        header = parse_json(b64url_decode(parts[0]))
    except JwsError as exc:
        raise JwsError(f"the JWS header is not usable: {exc}") from None
    if not isinstance(header, dict):
        raise JwsError("the JWS header is not a JSON object")
    if header.get("alg") != algorithm:
        raise JwsError(f"the JWS algorithm must be {algorithm}, not {header.get('alg')!r}")
    if "crit" in header:
        raise JwsError("the JWS header has critical extensions this connector does not know")
    return parts, header


def read_header(token: str) -> Mapping[str, Any]:
    """The protected header of a compact JWS, checked to name EdDSA and a key id."""
    _, header = _split(token, ALGORITHM)
    if not isinstance(header.get("kid"), str):
        raise JwsError("the JWS header names no key id (kid)")
    return header


def verify(
    token: str, key: ed25519.Ed25519PublicKey, *, detached_payload: bytes | None = None
) -> VerifiedJws:
    """Check a compact JWS with key; pass detached_payload for a detached signature."""
    header = read_header(token)
    protected, body, signature = token.strip().split(".")
    if detached_payload is not None:
        if body:
            raise JwsError("expected a detached JWS (empty payload part)")
        body = b64url(detached_payload)
    try:
        key.verify(b64url_decode(signature), f"{protected}.{body}".encode("ascii"))
    except InvalidSignature:
        raise SignatureMismatch("the signature does not match") from None
    return VerifiedJws(header, b64url_decode(body))
