"""Whom a federated query asks: `--to` values and `--all` resolved through the member
directory, and the check that a member's endpoint presents that member's certificate.

A member id is looked up in the signed directory the home holds; before anything is sent
to it, a TLS handshake of our own with its endpoint must show a certificate, chained to the
data space's CA, that carries the member's SPIFFE id.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from connector.client import PeerIdentity
from connector.directory import Directory, check_endpoint
from connector.errors import (
    ConnectorError,
    DirectoryError,
    PeerUnreachable,
    QueryTimeout,
    WrongIdentity,
)
from connector.identity import member_identity, spiffe_id
from connector.names import MEMBER_ID

ROLE_PREFIX = "role:"


@dataclass(frozen=True)
class Target:
    """One member to ask: how it is named, where it answers, who it must prove to be."""

    label: str
    address: str
    member_id: str = ""  # set when looked up in the directory: the identity checked


def resolve_targets(
    specs: Sequence[str],
    *,
    everyone: bool = False,
    directory: Directory | None = None,
    own_member: str = "",
) -> list[Target]:
    """Targets for `--to` values (member id, role:ROLE, HOST:PORT) and `--all`, in order and
    without repeats; DirectoryError before anyone is contacted when one cannot be resolved."""
    found: dict[str, Target] = {}
    wanted = [*specs, *([f"{ROLE_PREFIX}*"] if everyone else [])]
    for spec in wanted:
        for target in _resolve(spec, directory, own_member):
            found.setdefault(target.label, target)
    if not found:
        raise DirectoryError("no member to ask: name them with --to, --to role:ROLE or --all")
    return list(found.values())


def _needs(directory: Directory | None, what: str) -> Directory:
    if directory is None:
        raise DirectoryError(
            f"{what} is looked up in the member directory, and this home holds none: take the "
            "authority's with `connector directory update --home HOME FILE`, or use HOST:PORT"
        )
    return directory


def _resolve(spec: str, directory: Directory | None, own_member: str) -> list[Target]:
    if spec.startswith(ROLE_PREFIX):
        role = spec[len(ROLE_PREFIX) :]
        held = _needs(directory, "--all" if role == "*" else f"role {role}")
        entries = held.members if role == "*" else held.with_role(role)
        targets = [
            Target(e.id, e.endpoints[0], e.id)
            for e in entries
            if e.id != own_member and e.endpoints  # a member that only asks answers nothing
        ]
        if not targets:
            what = (
                "the directory lists no other member"
                if role == "*"
                else f"no member has role {role}"
            )
            raise DirectoryError(f"{what} (directory version {held.version})")
        return targets
    if MEMBER_ID.fullmatch(spec) and ":" not in spec:
        held = _needs(directory, f"member {spec}")
        entry = held.member(spec)
        if entry is None:
            raise DirectoryError(
                f"{spec} is not a member in the directory (version {held.version}); see "
                "`connector members`"
            )
        if not entry.endpoints:
            raise DirectoryError(
                f"{spec} lists no endpoint in the directory: it answers no queries"
            )
        return [Target(entry.id, entry.endpoints[0], entry.id)]
    return [Target(check_endpoint(spec), spec)]


# ---------------------------------------------------------------------------------------
# The identity an endpoint presents, checked before anything is sent


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


@contextlib.contextmanager
def _as_files(*contents: bytes) -> Iterator[list[str]]:
    """Paths that read as contents: Python's ssl loads a client key only from a file. In
    memory (memfd) where the system has it, so the key is never written to a disk."""
    if hasattr(os, "memfd_create"):
        descriptors = [os.memfd_create("connector-tls") for _ in contents]
        try:
            for descriptor, data in zip(descriptors, contents, strict=True):
                os.write(descriptor, data)
            yield [f"/proc/self/fd/{d}" for d in descriptors]
        finally:
            for descriptor in descriptors:
                os.close(descriptor)
        return
    with tempfile.TemporaryDirectory() as folder:  # private to this user (mode 0700)
        paths = [Path(folder, f"{n}.pem") for n in range(len(contents))]
        for path, data in zip(paths, contents, strict=True):
            path.touch(mode=0o600)
            path.write_bytes(data)
        yield [str(p) for p in paths]


def presented_member(address: str, identity: PeerIdentity, timeout: float) -> str:
    """The SPIFFE id of the certificate the endpoint presents in a TLS handshake (chained to
    the data space's CA); PeerUnreachable when no handshake completes."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the member's SPIFFE id is what is checked, below
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=identity.ca_pem.decode("ascii"))
    context.set_alpn_protocols(["h2"])
    with _as_files(identity.cert_pem, identity.key_pem) as (cert, key):
        context.load_cert_chain(cert, key)
    try:
        with (
            socket.create_connection(_host_port(address), timeout=timeout) as raw,
            context.wrap_socket(raw) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except TimeoutError:
        raise QueryTimeout(f"{address} did not complete a TLS handshake in time") from None
    except ssl.SSLCertVerificationError:
        raise WrongIdentity(
            f"{address} presented a certificate not issued by your data space's CA; nothing "
            "was sent"
        ) from None
    except (OSError, ValueError) as exc:
        raise PeerUnreachable(
            f"{address} is unreachable or refused the TLS handshake: {exc}"
        ) from None
    if der is None:
        raise WrongIdentity(f"{address} presented no certificate")
    try:
        return member_identity(x509.load_der_x509_certificate(der)).spiffe_id
    except (ConnectorError, ValueError):
        return "(no member id)"


def check_member_endpoint(
    target: Target, identity: PeerIdentity, dataspace: str, timeout: float
) -> None:
    """Refuse (WrongIdentity) when target names a member and its endpoint presents a
    certificate without that member's SPIFFE id."""
    if not target.member_id:
        return
    expected = spiffe_id(dataspace, target.member_id)
    presented = presented_member(target.address, identity, timeout)
    if presented != expected:
        raise WrongIdentity(
            f"{target.address} presented the certificate of {presented}, not of member "
            f"{target.member_id}; nothing was sent (the directory or the network is wrong)"
        )


def dataspace_of(identity: PeerIdentity) -> str:
    """The data space of our own certificate (the one the members' ids are checked in)."""
    return member_identity(x509.load_pem_x509_certificate(identity.cert_pem)).dataspace
