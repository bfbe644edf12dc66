"""Signed receipts: what a provider answered, under which policies, provable by both sides.

A receipt is a JSON object signed as a compact JWS (EdDSA) with the provider's receipt key.
The peer keeps it beside the result: the result's sha256 in it binds the exact Arrow bytes.
The provider's TLS key endorses the receipt key (ES256), so a receipt is checked against
the owner's certificate, which chains to the data space's CA.
"""

from __future__ import annotations

import builtins
import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from connector import jws
from connector.canonical import canonical_bytes
from connector.identity import member_identity, public_pem
from connector.policy.ref import PolicyRef


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
    policies: tuple[PolicyRef, ...]
    audit_seq: int = 0
    obligations: dict[str, Any] = field(default_factory=dict)
    limited_by: str = ""  # the limit that cut the result ("" when not truncated)
    client_reference: str = ""  # the peer's own id for the request; request_id is ours
    # dataset -> [since_version, version]: the answer covers the rows added after since (0:
    # all rows) up to and including version.
    versions: dict[str, list[int]] = field(default_factory=dict)
    issued_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    )

    def to_json(self) -> builtins.bytes:
        """Canonical JSON (sorted keys, no spaces) of the fields."""
        # Field by field, not dataclasses.asdict: its deep copy was a third of the signing.
        record = {name: getattr(self, name) for name in _RECEIPT_FIELDS}
        record["policies"] = [{"id": p.id, "version": p.version} for p in self.policies]
        return canonical_bytes(record)

    @classmethod
    def from_json(cls, data: builtins.bytes) -> ReceiptFields:
        """Parse the signed payload back; ValueError when it does not have the fields."""
        raw: dict[str, Any] = jws.parse_json(data)
        policies = tuple(PolicyRef(str(p["id"]), int(p["version"])) for p in raw.pop("policies"))
        return cls(policies=policies, **raw)


_RECEIPT_FIELDS = tuple(f.name for f in fields(ReceiptFields))


@dataclass(frozen=True)
class ReceiptEndorsement:
    """What ties receipts to the provider: its TLS key's JWS endorsing the receipt key, and
    that TLS certificate. Replaced as one (a rotation must never pair one with the other's
    predecessor, or receipts signed meanwhile would not verify)."""

    jws: str = ""
    certificate_pem: str = ""


class ReceiptSigner:
    """Signs receipts with the provider's Ed25519 receipt key, endorsed by its TLS key."""

    def __init__(
        self, key: ed25519.Ed25519PrivateKey, endorsement: ReceiptEndorsement | None = None
    ) -> None:
        self._key = key
        # Read once per answer: a TLS reload replaces it whole.
        self.endorsement = endorsement or ReceiptEndorsement()
        self.key_id = jws.key_id(key.public_key())
        self.public_key_pem = public_pem(key.public_key()).decode()

    def sign(self, receipt: ReceiptFields) -> str:
        """The compact JWS of the receipt."""
        return jws.sign(receipt.to_json(), self._key, detached=False, kid=self.key_id)

    def sign_json(self, claim: Mapping[str, Any]) -> str:
        """A compact JWS over canonical JSON of claim (audit checkpoints)."""
        return jws.sign(canonical_bytes(dict(claim)), self._key, detached=False, kid=self.key_id)


def verify_receipt(token: str, public_key: ed25519.Ed25519PublicKey) -> ReceiptFields:
    """Check a receipt's signature and return what it states; jws.JwsError when it fails."""
    verified = jws.verify(token, public_key)
    try:
        return ReceiptFields.from_json(verified.payload)
    except (ValueError, KeyError, TypeError):
        raise jws.JwsError("the receipt payload does not have the receipt fields") from None


def endorse_receipt_key(
    tls_key: ec.EllipticCurvePrivateKey, provider_id: str, receipt_key: ed25519.Ed25519PublicKey
) -> str:
    """A JWS (ES256) by the member's TLS key naming its receipt key, so peers can tie the two."""
    claim = {
        "provider_id": provider_id,
        "receipt_key_id": jws.key_id(receipt_key),
        "receipt_public_key": public_pem(receipt_key).decode(),
    }
    return jws.sign_es256(canonical_bytes(claim), tls_key)


def endorsed_receipt_key(
    endorsement: str, provider_cert: x509.Certificate
) -> ed25519.Ed25519PublicKey:
    """The receipt key a provider's certificate endorses; JwsError when it does not."""
    cert_key = provider_cert.public_key()
    if not isinstance(cert_key, ec.EllipticCurvePublicKey):
        raise jws.JwsError("the provider's certificate does not hold an EC P-256 key")
    claim = json.loads(jws.verify_es256(endorsement, cert_key))
    if claim.get("provider_id") != member_identity(provider_cert).member_id:
        raise jws.JwsError("the endorsement names another provider than the certificate")
    key = serialization.load_pem_public_key(str(claim.get("receipt_public_key", "")).encode())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise jws.JwsError("the endorsed receipt key is not an Ed25519 key")
    return key


@dataclass(frozen=True)
class ReceiptBundle:
    """What a peer keeps next to a result: the receipt and what proves who signed it."""

    receipt_jws: str
    endorsement: str
    provider_certificate_pem: str
    data_format: str = "arrow"  # how the result beside it was saved (result_files.FORMATS)

    def save(self, path: Path) -> None:
        """Write the bundle as JSON."""
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> ReceiptBundle:
        """Read a bundle written by save(); ValueError when it is not one."""
        raw = jws.parse_json(path.read_text(encoding="utf-8"))
        known = set(cls.__dataclass_fields__)
        required = known - {"data_format"}  # receipts saved before it existed lack it
        if not isinstance(raw, dict) or not required <= set(raw) <= known:
            raise ValueError(f"{path} is not a connector receipt file")
        return cls(**{k: str(v) for k, v in raw.items()})


def verify_bundle(bundle: ReceiptBundle, ca_pem: bytes, data: bytes | None) -> ReceiptFields:
    """Check the provider's certificate against the CA, the endorsement, the signature, the data."""
    return verify_endorsed(bundle.receipt_jws, provider_proof(bundle, ca_pem), data)


@dataclass(frozen=True)
class ProviderProof:
    """A provider's receipt key, as its CA-issued certificate endorses it."""

    provider_id: str
    receipt_key: ed25519.Ed25519PublicKey


def provider_proof(bundle: ReceiptBundle, ca_pem: bytes) -> ProviderProof:
    """The receipt key the bundle's certificate (issued by the CA) endorses; JwsError if not.
    A function of the certificate, the endorsement and the CA alone: peers may keep it."""
    try:
        cert = x509.load_pem_x509_certificate(bundle.provider_certificate_pem.encode())
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_pem))
    except (ValueError, TypeError, InvalidSignature):
        raise jws.JwsError(
            "the provider's certificate is not issued by your data space's CA"
        ) from None
    key = endorsed_receipt_key(bundle.endorsement, cert)
    return ProviderProof(member_identity(cert).member_id, key)


def verify_endorsed(token: str, proof: ProviderProof, data: bytes | None) -> ReceiptFields:
    """Check a receipt's signature by the proven key, its provider and the data's digest."""
    fields = verify_receipt(token, proof.receipt_key)
    if fields.provider_id != proof.provider_id:
        raise jws.JwsError("the receipt names another provider than the certificate")
    if data is not None and hashlib.sha256(data).hexdigest() != fields.result_sha256:
        raise jws.JwsError(
            "the data does not match the receipt's digest (it covers the Arrow bytes as "
            "received; keep them with --format arrow)"
        )
    return fields
