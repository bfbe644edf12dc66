"""Keys, certificates, the development data-space CA, and member ids from verified certificates.

TLS certificates use ECDSA P-256 because gRPC's TLS stack does not negotiate Ed25519
certificates (checked: the handshake fails); policy and receipt signatures use Ed25519.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from connector.errors import IdentityError, NotAuthenticated
from connector.names import DATASPACE, MEMBER_ID

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CA_VALID_DAYS = 3650
MEMBER_VALID_DAYS = 397
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class MemberIdentity:
    """Who a verified certificate names: data space, member id, display name and serial."""

    dataspace: str
    member_id: str
    display_name: str
    serial: int

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE URI the certificate carries."""
        return spiffe_id(self.dataspace, self.member_id)


def spiffe_id(dataspace: str, member_id: str) -> str:
    """The SPIFFE URI of a member: spiffe://DATASPACE/member/MEMBER_ID."""
    return f"spiffe://{dataspace}/member/{member_id}"


def check_member_id(member_id: str) -> str:
    """Return member_id if it is a valid member id, else raise IdentityError saying the rule."""
    if not MEMBER_ID.fullmatch(member_id):
        raise IdentityError(
            f"invalid member id {member_id!r}: use 1-63 lower-case letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return member_id


def check_dataspace_name(name: str) -> str:
    """Return name if it is a valid data-space name (a SPIFFE trust domain)."""
    if not DATASPACE.fullmatch(name):
        raise IdentityError(
            f"invalid data-space name {name!r}: use 1-63 lower-case letters, digits, '.' or "
            "'-' (it becomes the SPIFFE trust domain)"
        )
    return name


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret with mode 0600 from the start, never world-readable for a moment."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _pem_private(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _save(
    key: ec.EllipticCurvePrivateKey, key_path: Path, cert: x509.Certificate, cert_path: Path
) -> Path:
    """Write a key (0600) and its certificate; returns the certificate's path."""
    _write_private(key_path, _pem_private(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read {what} {path}: {exc.strerror}") from None


def create_dataspace_ca(directory: Path, name: str) -> Path:
    """Make a development CA for data space `name` in directory (ca.pem, ca.key)."""
    check_dataspace_name(name)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    if cert_path.exists() or key_path.exists():
        raise IdentityError(
            f"{directory} already holds a data-space CA; choose another folder or remove "
            f"{CA_CERT_FILE} and {CA_KEY_FILE} first (every member certificate depends on it)"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} data-space development CA"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{name}")]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return _save(key, key_path, cert, cert_path)


def dataspace_name_of(ca_cert: x509.Certificate) -> str:
    """The data-space name a development CA carries in its spiffe:// URI SAN."""
    try:
        san = ca_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError("the CA certificate has no spiffe:// trust-domain URI") from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://") :]:
            return check_dataspace_name(uri[len("spiffe://") :])
    raise IdentityError("the CA certificate has no spiffe:// trust-domain URI")


def load_certificate(path: Path) -> x509.Certificate:
    """Read one PEM certificate, with a clear error when it is missing or not a certificate."""
    try:
        return x509.load_pem_x509_certificate(_read(path, "certificate"))
    except ValueError:
        raise IdentityError(f"{path} is not a PEM certificate") from None


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    """Read an unencrypted PEM private key (EC P-256 or Ed25519)."""
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError):
        raise IdentityError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{path}: unsupported key type; use EC P-256 or Ed25519")
    return key


def _host_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue_member_certificate(
    ca_dir: Path,
    member_id: str,
    out_dir: Path,
    *,
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    display_name: str | None = None,
) -> Path:
    """Write out_dir/cert.pem and key.pem for member_id, signed by the CA in ca_dir."""
    check_member_id(member_id)
    ca_cert = load_certificate(ca_dir / CA_CERT_FILE)
    ca_key = load_private_key(ca_dir / CA_KEY_FILE)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{ca_dir / CA_KEY_FILE}: the CA key must be EC P-256")
    dataspace = dataspace_name_of(ca_cert)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, display_name or member_id),
            x509.NameAttribute(NameOID.COMMON_NAME, member_id),
        ]
    )
    san = [x509.UniformResourceIdentifier(spiffe_id(dataspace, member_id)), *_host_names(hosts)]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(
            min(now + dt.timedelta(days=MEMBER_VALID_DAYS), ca_cert.not_valid_after_utc)
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return _save(key, out_dir / "key.pem", cert, out_dir / "cert.pem")


def member_identity(cert: x509.Certificate) -> MemberIdentity:
    """Read the member a (chain-verified) certificate names from its SPIFFE URI SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise NotAuthenticated("the certificate has no SPIFFE member id (URI SAN)") from None
    ids = [
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith("spiffe://")
    ]
    if len(ids) != 1:
        raise NotAuthenticated(
            "the certificate must carry exactly one spiffe://DATASPACE/member/ID URI SAN"
        )
    dataspace, member_id = member_of_spiffe_id(ids[0])
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    display = str(orgs[0].value) if orgs else member_id
    return MemberIdentity(dataspace, member_id, display, cert.serial_number)


def member_of_spiffe_id(uri: str) -> tuple[str, str]:
    """The data space and member id a (verified) spiffe://DATASPACE/member/ID names."""
    match = re.fullmatch(r"spiffe://([^/]+)/member/([^/]+)", uri)
    if match is None or not MEMBER_ID.fullmatch(match.group(2)):
        raise NotAuthenticated(f"the certificate's SPIFFE id {uri[:200]!r} names no member")
    return match.group(1), match.group(2)


def generate_ed25519_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Create an Ed25519 private key at path (mode 0600) and its public key at path.pub."""
    key = ed25519.Ed25519PrivateKey.generate()
    _write_private(path, _pem_private(key))
    public_path(path).write_bytes(public_pem(key.public_key()))
    return key


def public_path(private_key_path: Path) -> Path:
    """Where the public half of a key file lives: the same name with '.pub' added."""
    return private_key_path.with_name(private_key_path.name + ".pub")


def public_pem(key: ed25519.Ed25519PublicKey) -> bytes:
    """PEM (SubjectPublicKeyInfo) of an Ed25519 public key."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_ed25519_private(path: Path) -> ed25519.Ed25519PrivateKey:
    """Read an Ed25519 private key (policy or receipt signing)."""
    key = load_private_key(path)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(f"{path} is not an Ed25519 key")
    return key


def load_ed25519_public(path: Path) -> ed25519.Ed25519PublicKey:
    """Read an Ed25519 public key in PEM form (a trusted policy signer)."""
    try:
        key = serialization.load_pem_public_key(_read(path, "public key"))
    except ValueError:
        raise IdentityError(f"{path} is not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise IdentityError(f"{path} is not an Ed25519 public key")
    return key
