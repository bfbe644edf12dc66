"""The signed member directory: who is in the data space, where they answer, their roles.

The data-space authority keeps a draft (DIR/members.json, beside its CA) and publishes it as
FILE (canonical JSON) with FILE.jws beside it: a detached JWS (ES256) by the data space's CA
key, with a version one above the last one published. What a member's home holds of it is
held_directory.py. Every reader checks the signature against the home's CA bundle again: a
directory file is hostile input until then.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from connector import jws
from connector.canonical import canonical_bytes
from connector.errors import DirectoryError
from connector.names import MEMBER_ID

DIRECTORY_FORMAT = 1
DRAFT_FILE = "members.json"  # the authority's working list, in its DIR
SIGNATURE_SUFFIX = ".jws"
MAX_DIRECTORY_BYTES = 4 * 1024 * 1024
MAX_MEMBERS = 10_000
MAX_ENDPOINTS = 8
ROLE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
COUNTRY = re.compile(r"^[A-Z]{2}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_NAME_MAX = 200


@dataclass(frozen=True)
class MemberEntry:
    """One member: id, display name, where it answers, and the attributes the space vouches for."""

    id: str
    name: str
    endpoints: tuple[str, ...]
    roles: tuple[str, ...] = ()
    country: str = ""

    def as_json(self) -> dict[str, Any]:
        """The entry as the directory file writes it."""
        return {
            "id": self.id,
            "name": self.name,
            "endpoints": list(self.endpoints),
            "roles": list(self.roles),
            "country": self.country,
        }


@dataclass(frozen=True)
class Directory:
    """A verified (or draft) member directory of one data space."""

    dataspace: str
    version: int
    issued_at: str
    members: tuple[MemberEntry, ...] = ()

    def member(self, member_id: str) -> MemberEntry | None:
        """The entry of member_id, if listed."""
        return next((m for m in self.members if m.id == member_id), None)

    def with_role(self, role: str) -> tuple[MemberEntry, ...]:
        """The members with role, in id order."""
        return tuple(m for m in self.members if role in m.roles)

    def roles(self) -> dict[str, tuple[str, ...]]:
        """role -> the ids of the members holding it."""
        found: dict[str, list[str]] = {}
        for entry in self.members:
            for role in entry.roles:
                found.setdefault(role, []).append(entry.id)
        return {role: tuple(ids) for role, ids in sorted(found.items())}

    def to_json(self) -> bytes:
        """Canonical JSON: the exact bytes that are signed."""
        return canonical_bytes(
            {
                "format": DIRECTORY_FORMAT,
                "dataspace": self.dataspace,
                "version": self.version,
                "issued_at": self.issued_at,
                "members": [m.as_json() for m in sorted(self.members, key=lambda m: m.id)],
            }
        )


# ---------------------------------------------------------------------------------------
# Reading (every field checked: the file is hostile until its signature is)


def check_endpoint(endpoint: str) -> str:
    """endpoint if it is HOST:PORT (a DNS name, an IPv4 address or [IPv6]), else DirectoryError."""
    host, sep, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            host = ""
    elif not _HOST.fullmatch(host):
        host = ""
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DirectoryError(
            f"invalid endpoint {endpoint!r}: use HOST:PORT (a DNS name or IP address, and a "
            "port from 1 to 65535)"
        )
    return endpoint


def check_role(role: str) -> str:
    """role if it is a valid role name (lower-case letters, digits, '_', '-')."""
    if not ROLE.fullmatch(role):
        raise DirectoryError(
            f"invalid role {role!r}: use 1-63 lower-case letters, digits, '_' or '-', "
            "starting with a letter"
        )
    return role


def _text(raw: dict[str, Any], key: str, where: str) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise DirectoryError(f"{where}: {key} must be text")
    return value


def parse_entry(raw: object, position: int) -> MemberEntry:
    where = f"member #{position + 1}"
    if not isinstance(raw, dict) or not set(raw) <= {"id", "name", "endpoints", "roles", "country"}:
        raise DirectoryError(f"{where} is not an object with id, name, endpoints, roles, country")
    member_id = _text(raw, "id", where)
    if not MEMBER_ID.fullmatch(member_id):
        raise DirectoryError(f"{where}: {member_id!r} is not a member id")
    name = _text(raw, "name", where)
    if len(name) > _NAME_MAX or not name.isprintable():
        raise DirectoryError(f"{where} ({member_id}): the name is too long or not printable")
    endpoints, roles = raw.get("endpoints"), raw.get("roles", [])
    if not isinstance(endpoints, list) or len(endpoints) > MAX_ENDPOINTS:
        raise DirectoryError(f"{where} ({member_id}): endpoints must list at most {MAX_ENDPOINTS}")
    if not all(isinstance(e, str) for e in endpoints):
        raise DirectoryError(f"{where} ({member_id}): each endpoint must be HOST:PORT text")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise DirectoryError(f"{where} ({member_id}): roles must be a list of names")
    country = _text(raw, "country", where)
    if country and not COUNTRY.fullmatch(country):
        raise DirectoryError(f"{where} ({member_id}): country must be two capital letters")
    return MemberEntry(
        member_id,
        name,
        tuple(check_endpoint(e) for e in endpoints),
        tuple(check_role(r) for r in roles),
        country,
    )


def parse_directory(data: bytes) -> Directory:
    """The directory in data (the published JSON); DirectoryError says what is wrong."""
    if len(data) > MAX_DIRECTORY_BYTES:
        raise DirectoryError(f"the directory is larger than {MAX_DIRECTORY_BYTES} bytes")
    try:
        raw = jws.parse_json(data)
    except jws.JwsError as exc:
        raise DirectoryError(f"the directory is not JSON: {exc}") from None
    if not isinstance(raw, dict) or set(raw) != {
        "format",
        "dataspace",
        "version",
        "issued_at",
        "members",
    }:
        raise DirectoryError(
            "not a member directory (it needs exactly format, dataspace, version, issued_at "
            "and members)"
        )
    if raw["format"] != DIRECTORY_FORMAT:
        raise DirectoryError(
            f"directory format {raw['format']!r} is not {DIRECTORY_FORMAT}; upgrade the connector"
        )
    version = raw["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise DirectoryError("the directory's version must be a whole number")
    members = raw["members"]
    if not isinstance(members, list) or len(members) > MAX_MEMBERS:
        raise DirectoryError(f"the directory's members must be a list of at most {MAX_MEMBERS}")
    entries = tuple(parse_entry(m, i) for i, m in enumerate(members))
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        raise DirectoryError("the directory lists a member id twice")
    if not isinstance(raw["dataspace"], str) or not isinstance(raw["issued_at"], str):
        raise DirectoryError("the directory's dataspace and issued_at must be text")
    return Directory(raw["dataspace"], version, raw["issued_at"], entries)


def _ca_keys(ca_pem: bytes) -> list[ec.EllipticCurvePublicKey]:
    try:
        certificates = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise DirectoryError("the data space's CA bundle holds no PEM certificate") from None
    # Only CA certificates: a member's own certificate in the bundle must not be able to
    # sign a directory (that gives it roles), though its key makes the same kind of JWS.
    keys = [c.public_key() for c in certificates if _is_ca(c)]
    return [k for k in keys if isinstance(k, ec.EllipticCurvePublicKey)]


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return bool(constraints.value.ca)


def verify_directory(data: bytes, signature: str, ca_pem: bytes, dataspace: str) -> Directory:
    """The directory in data, once its detached signature checks out against a CA of the
    bundle and it names this data space; DirectoryError otherwise."""
    if not signature.strip():
        raise DirectoryError("the directory is not signed (no signature beside it)")
    for key in _ca_keys(ca_pem):
        try:
            jws.verify_es256(signature.strip(), key, detached_payload=data)
        except jws.SignatureMismatch:
            continue
        except jws.JwsError as exc:
            raise DirectoryError(f"the directory's signature is malformed: {exc}") from None
        break
    else:
        raise DirectoryError(
            "the directory's signature does not verify against your data space's CA: it was "
            "changed after publishing, or published by another authority"
        )
    directory = parse_directory(data)
    if directory.dataspace != dataspace:
        raise DirectoryError(
            f"the directory is for data space {directory.dataspace!r}, not {dataspace!r}"
        )
    return directory


# ---------------------------------------------------------------------------------------
# The published file and what the directory says


def signature_path(path: Path) -> Path:
    """Where a published directory's detached signature lives: FILE.jws."""
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def members_with_roles(directory: Directory | None, roles: Iterable[str]) -> tuple[str, ...]:
    """The ids of the members holding any of roles (none without a directory: fail closed)."""
    if directory is None:
        return ()
    wanted = set(roles)
    return tuple(m.id for m in directory.members if wanted & set(m.roles))


def describe(entries: Sequence[MemberEntry]) -> list[str]:
    """One line per member, for `member list` and `connector members`."""
    lines = []
    for m in entries:
        roles = ", ".join(m.roles) or "-"
        lines.append(
            f"{m.id}  {m.name}  endpoints {', '.join(m.endpoints) or '-'}  roles {roles}"
            + (f"  country {m.country}" if m.country else "")
        )
    return lines
