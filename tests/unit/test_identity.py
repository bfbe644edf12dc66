"""Development CA, member certificates and member ids read from them."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from cryptography import x509

from connector.errors import IdentityError, NotAuthenticated
from connector.identity import (
    create_dataspace_ca,
    issue_member_certificate,
    load_certificate,
    member_identity,
)


def test_member_certificate_names_member_hosts_and_chains_to_the_ca(tmp_path: Path) -> None:
    create_dataspace_ca(tmp_path / "ca", "auto-space")
    issue_member_certificate(
        tmp_path / "ca",
        "acme",
        tmp_path / "acme",
        hosts=("localhost", "127.0.0.1", "acme.example"),
        display_name="ACME GmbH",
    )
    cert = load_certificate(tmp_path / "acme" / "cert.pem")
    ca = load_certificate(tmp_path / "ca" / "ca.pem")
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://auto-space/member/acme"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "acme.example"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    identity = member_identity(cert)
    assert (identity.dataspace, identity.member_id, identity.display_name) == (
        "auto-space",
        "acme",
        "ACME GmbH",
    )
    assert (tmp_path / "acme" / "key.pem").stat().st_mode & 0o077 == 0


def test_ca_is_not_overwritten(tmp_path: Path) -> None:
    create_dataspace_ca(tmp_path, "space")
    with pytest.raises(IdentityError, match="already holds"):
        create_dataspace_ca(tmp_path, "space")


@pytest.mark.parametrize("bad", ["", "Upper", "a/b", "x" * 64, "../etc"])
def test_bad_member_ids_are_refused(tmp_path: Path, bad: str) -> None:
    create_dataspace_ca(tmp_path / "ca", "space")
    with pytest.raises(IdentityError, match="invalid member id"):
        issue_member_certificate(tmp_path / "ca", bad, tmp_path / "out")


def test_a_certificate_without_spiffe_id_names_no_member(tmp_path: Path) -> None:
    create_dataspace_ca(tmp_path, "space")
    with pytest.raises(NotAuthenticated, match="names no member"):
        member_identity(load_certificate(tmp_path / "ca.pem"))
