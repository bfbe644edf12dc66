"""Signed receipts: what the provider answered, under which policies, provable by both sides.

A receipt is a JSON object signed as a compact JWS (EdDSA) with the provider's receipt key.
The peer keeps it beside the result; the result's sha256 in it binds the exact Arrow bytes.
"""

from __future__ import annotations

import builtins
import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from connector import jws
from connector.identity import public_pem


@dataclass(frozen=True)
class PolicyUse:
    """A policy (id and version) under which something was answered."""

    id: str
    version: int


@dataclass(frozen=True)
class ReceiptFields:
    """Everything a receipt states; the signed JSON is exactly these fields."""

    request_id: str
    member_id: str
    provider_id: str
    purpose: str
    query_sha256: str
    result_sha256: str
    rows: int
    bytes: int
    truncated: bool
    policies: tuple[PolicyUse, ...]
    issued_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    )

    def to_json(self) -> builtins.bytes:
        """Canonical JSON (sorted keys, no spaces) of the fields."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: builtins.bytes) -> ReceiptFields:
        """Parse the signed payload back; ValueError when it does not have the fields."""
        raw: dict[str, Any] = json.loads(data)
        policies = tuple(PolicyUse(str(p["id"]), int(p["version"])) for p in raw.pop("policies"))
        return cls(policies=policies, **raw)


class ReceiptSigner:
    """Signs receipts with the provider's Ed25519 receipt key."""

    def __init__(self, key: ed25519.Ed25519PrivateKey) -> None:
        self._key = key
        self.key_id = jws.key_id(key.public_key())
        self.public_key_pem = public_pem(key.public_key()).decode()

    def sign(self, fields: ReceiptFields) -> str:
        """The compact JWS of the receipt."""
        return jws.sign(fields.to_json(), self._key, detached=False)


def verify_receipt(token: str, public_key: ed25519.Ed25519PublicKey) -> ReceiptFields:
    """Check a receipt's signature and return what it states; jws.JwsError when it fails."""
    verified = jws.verify(token, public_key)
    try:
        return ReceiptFields.from_json(verified.payload)
    except (ValueError, KeyError, TypeError):
        raise jws.JwsError("the receipt payload does not have the receipt fields") from None


def policy_uses(pairs: Sequence[tuple[str, int]]) -> tuple[PolicyUse, ...]:
    """Sorted, de-duplicated policy uses from (id, version) pairs."""
    return tuple(PolicyUse(i, v) for i, v in sorted(set(pairs)))
