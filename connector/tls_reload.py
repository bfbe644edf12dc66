"""The server's certificate, key and CA bundle, read again without a restart.

gRPC asks `ServerTlsFiles.fetch` for the TLS configuration at each new handshake
(`grpc.dynamic_ssl_server_credentials`); connections already open keep the files they
started with. New files are taken on SIGHUP (`reload`) and when they change on disk. A set
that does not fit together (a key that is not the certificate's, a certificate the CA
bundle did not issue or that names another member: typically files caught half copied)
is refused with the reason in the log, and the files in force stay in force.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from connector.errors import ConnectorError, IdentityError
from connector.identity import member_identity

# A new certificate may start this much after this machine's clock (issued elsewhere).
CLOCK_SKEW = dt.timedelta(minutes=5)

log = logging.getLogger(__name__)

FileStamp = tuple[tuple[int, int, int], ...]  # (inode, size, mtime) of each file


@dataclass(frozen=True)
class TlsMaterial:
    """One checked set of the server's TLS files, as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        """What gRPC serves for this set."""
        return grpc.ssl_server_certificate_configuration(
            [(self.key_pem, self.cert_pem)], root_certificates=self.ca_pem
        )


def read_tls_material(
    cert: Path, key: Path, ca: Path, member_id: str, dataspace: str
) -> TlsMaterial:
    """Read and check the files; IdentityError says what does not fit."""
    files = {}
    for what, path in (("certificate", cert), ("key", key), ("CA bundle", ca)):
        try:
            files[what] = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None
    try:
        chain = x509.load_pem_x509_certificates(files["certificate"])
        private = serialization.load_pem_private_key(files["key"], password=None)
        authorities = x509.load_pem_x509_certificates(files["CA bundle"])
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # TypeError: a key protected by a password, which a server cannot type in.
        raise IdentityError(f"a TLS file is not usable PEM: {exc}") from None
    certificate = chain[0]
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{key}: the TLS key must be EC P-256")
    if _spki(private.public_key()) != _spki(certificate.public_key()):
        raise IdentityError(f"{key} is not the key of the certificate {cert}")
    if not _chains_to(chain, authorities):
        raise IdentityError(f"{cert} was not issued by a CA in the bundle {ca}")
    try:
        named = member_identity(certificate)
    except ConnectorError as exc:
        raise IdentityError(f"{cert}: {exc.message}") from None
    if named.member_id != member_id:
        raise IdentityError(
            f"{cert} is the certificate of member {named.member_id!r}, not {member_id!r}"
        )
    if named.dataspace != dataspace:
        raise IdentityError(
            f"{cert} is a certificate of data space {named.dataspace!r}, not {dataspace!r}"
        )
    now = dt.datetime.now(dt.UTC)
    if certificate.not_valid_after_utc <= now:
        raise IdentityError(f"{cert} expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
    if certificate.not_valid_before_utc > now + CLOCK_SKEW:
        # Peers would refuse it in every handshake: the set in force is kept meanwhile.
        raise IdentityError(
            f"{cert} is valid only from {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "put it in place then (or check this machine's clock)"
        )
    return TlsMaterial(files["certificate"], files["key"], files["CA bundle"], private, certificate)


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _chains_to(chain: list[x509.Certificate], authorities: list[x509.Certificate]) -> bool:
    """The certificate (then any intermediates, in order) leads to a CA in the bundle."""
    if any(not _issued_by(child, parent) for child, parent in itertools.pairwise(chain)):
        return False
    top = chain[-1]
    return top in authorities or any(_issued_by(top, authority) for authority in authorities)


def _issued_by(certificate: x509.Certificate, authority: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(authority)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _stamp(paths: tuple[Path, ...]) -> FileStamp:
    stamps = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            stamps.append((0, 0, 0))
        else:
            stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


class ServerTlsFiles:
    """The TLS files in force for new connections; thread-safe."""

    def __init__(
        self,
        cert: Path,
        key: Path,
        ca: Path,
        *,
        member_id: str,
        dataspace: str,
        on_change: Callable[[TlsMaterial], None] | None = None,
    ) -> None:
        """Read the files now (IdentityError if they do not fit); on_change is told of
        every later set put in force."""
        self._paths = (cert, key, ca)
        self._member = (member_id, dataspace)
        self._on_change = on_change
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self.material = read_tls_material(cert, key, ca, member_id, dataspace)
        self._version = 0  # sets put in force since start
        self._served = 0  # the version gRPC was last handed

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that demand a client certificate and follow these files."""
        return grpc.dynamic_ssl_server_credentials(
            self.material.configuration(), self.fetch, require_client_authentication=True
        )

    def reload(self) -> bool:
        """Read the files again now (SIGHUP); True when a new set is in force."""
        with self._lock:
            return self._read(force=True)

    def reload_if_changed(self) -> bool:
        """Read the files again if any changed on disk; True when a new set is in force."""
        with self._lock:
            return self._read(force=False)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question at a new handshake: a new configuration, or None to keep it."""
        try:
            with self._lock:
                self._read(force=False)
                if self._served == self._version:
                    return None
                self._served = self._version
                return self.material.configuration()
        except Exception:
            # Raising here would fail the peer's handshake: the files in force stay.
            log.exception("checking the TLS files failed; serving the ones in force")
            return None

    def _read(self, *, force: bool) -> bool:
        stamp = _stamp(self._paths)
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp  # a refused set is not read again until a file changes
        try:
            material = read_tls_material(*self._paths, *self._member)
        except IdentityError as exc:
            log.error("new TLS files not taken, the ones in force stay: %s", exc.message)
            return False
        old = self.material
        if (material.cert_pem, material.key_pem, material.ca_pem) == (
            old.cert_pem,
            old.key_pem,
            old.ca_pem,
        ):
            return False
        self.material = material
        self._version += 1
        log.info(
            "TLS files reloaded: certificate serial %x valid until %s, %d CA certificate(s); "
            "new connections use them, open ones keep theirs",
            material.certificate.serial_number,
            material.certificate.not_valid_after_utc.date(),
            material.ca_pem.count(b"BEGIN CERTIFICATE"),
        )
        if self._on_change is not None:
            try:
                self._on_change(material)
            except Exception:
                log.exception("a listener of TLS reloads failed (the new files are in force)")
        return True
