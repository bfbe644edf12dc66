"""Who a TLS-verified peer is: the member its certificate or SPIFFE id names, refused when
it belongs to another data space or this connector revokes it."""

from __future__ import annotations

from cryptography import x509

from connector.config import Revocations
from connector.errors import NotAuthenticated
from connector.identity import MemberIdentity, member_identity, member_of_spiffe_id
from connector.recent import RecentlyUsed

# What a certificate names depends on its bytes alone: read once per certificate, while the
# data space and revocation checks run on every request.
_READ: RecentlyUsed[bytes, MemberIdentity] = RecentlyUsed(256)


def certificate_member(cert_pem: bytes | None, dataspace: str) -> MemberIdentity:
    """The member a TLS-verified peer certificate names, in this connector's data space."""
    if not cert_pem:
        raise NotAuthenticated("no client certificate was presented")
    identity = _READ.get(cert_pem)
    if identity is None:
        try:
            identity = member_identity(x509.load_pem_x509_certificate(cert_pem))
        except ValueError:
            raise NotAuthenticated("the client certificate could not be read") from None
        _READ.put(cert_pem, identity)
    return in_dataspace(identity, dataspace)


def refuse_revoked_certificate(identity: MemberIdentity, revoked: Revocations) -> None:
    """Refuse a member, or a certificate serial, this connector revokes."""
    if identity.member_id in revoked.members or identity.serial in revoked.serials:
        raise NotAuthenticated(
            f"member {identity.member_id!r} or its certificate is revoked by this connector; "
            "ask the provider's IT team"
        )


def spiffe_member(uri: str, dataspace: str) -> MemberIdentity:
    """The member a TLS-verified SPIFFE id names, in this connector's data space."""
    spiffe_dataspace, member_id = member_of_spiffe_id(uri)
    return in_dataspace(MemberIdentity(spiffe_dataspace, member_id, member_id, 0), dataspace)


def refuse_revoked_spiffe(identity: MemberIdentity, revoked: Revocations) -> None:
    """Refuse a revoked member; while any serial is revoked, refuse everyone, since a SPIFFE
    id carries no certificate serial (fail closed)."""
    if identity.member_id in revoked.members:
        raise NotAuthenticated(
            f"member {identity.member_id!r} is revoked by this connector; ask the provider's "
            "IT team"
        )
    if revoked.serials:
        raise NotAuthenticated(
            "this connector revokes certificates by serial, which this port cannot see, so "
            "it answers no one here; use the provider's gRPC port, or ask its IT team"
        )


def in_dataspace(identity: MemberIdentity, dataspace: str) -> MemberIdentity:
    """identity, refused unless it belongs to dataspace."""
    if identity.dataspace != dataspace:
        raise NotAuthenticated(
            f"the certificate belongs to data space {identity.dataspace!r}; this connector "
            f"serves {dataspace!r}"
        )
    return identity
