"""Certificate and CA rotation without a restart: the files in tls/ are read again when they
change (and on SIGHUP, see test_operations_process.py); open connections keep theirs."""

from __future__ import annotations

import datetime as dt
import ipaddress
import shutil
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from connector.client import Peer, PeerIdentity
from connector.errors import PeerError
from connector.identity import create_dataspace_ca
from connector.server import RunningServer
from tests.conftest import DATASPACE, Member, Space, connect, copied_space, run_cli

PURPOSE = "quality-benchmarking"


def served_certificate(port: int, member: Member) -> x509.Certificate:
    """The certificate the server presents in a new TLS handshake (as member, over mTLS)."""
    context = ssl.create_default_context(cafile=str(member.home / "tls" / "ca.pem"))
    context.load_cert_chain(member.home / "tls" / "cert.pem", member.home / "tls" / "key.pem")
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def rotate(dataspace: Path, member: Member, folder: Path, *hosts: str) -> x509.Certificate:
    """Issue member a new certificate with `connector dataspace issue` and put it in place."""
    host_args = [a for h in hosts for a in ("--host", h)]
    code = run_cli("dataspace", "issue", dataspace, member.member_id, "--out", folder, *host_args)
    assert code == 0
    # The key first, then the certificate: between the two the pair does not fit, and the
    # server must keep the files in force rather than fail handshakes.
    shutil.copyfile(folder / "key.pem", member.home / "tls" / "key.pem")
    shutil.copyfile(folder / "cert.pem", member.home / "tls" / "cert.pem")
    return x509.load_pem_x509_certificate((folder / "cert.pem").read_bytes())


@pytest.fixture
def rotating_space(
    tmp_path: Path, dataspace: Path, serve: Callable[[Member], RunningServer]
) -> Space:
    return copied_space(tmp_path / "space", dataspace, serve)


def test_a_new_certificate_is_served_to_new_connections_and_open_ones_go_on(
    tmp_path: Path, dataspace: Path, rotating_space: Space
) -> None:
    space = rotating_space
    port = space.server.port
    assert space.server.metrics_port == 0  # metrics are off unless [metrics] listen is set
    before = served_certificate(port, space.grantee)
    with space.peer() as open_peer:
        assert open_peer.catalog()  # the connection is open
        new = rotate(dataspace, space.provider, tmp_path / "new", "connector.example")
        # No signal, no reload call: the next handshake finds the files changed.
        served = served_certificate(port, space.grantee)
        assert served.serial_number == new.serial_number != before.serial_number
        # The connection opened before the rotation still answers.
        assert open_peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE).num_rows == 1
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "connector.example"} <= set(names.get_values_for_type(x509.DNSName))
    # A new peer checks its receipt against the certificate and endorsement now in force.
    with space.peer() as new_peer:
        new_peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE)
        assert new_peer.catalog()


def test_files_that_do_not_fit_together_are_refused_and_the_old_ones_stay(
    tmp_path: Path, dataspace: Path, rotating_space: Space, caplog: pytest.LogCaptureFixture
) -> None:
    space = rotating_space
    before = served_certificate(space.server.port, space.grantee)
    run_cli("dataspace", "issue", dataspace, "carmaker", "--out", tmp_path / "half")
    # Half copied: the new key beside the old certificate.
    shutil.copyfile(tmp_path / "half" / "key.pem", space.provider.home / "tls" / "key.pem")
    assert not space.server.tls.reload_if_changed()
    assert "is not the key of the certificate" in caplog.text
    # Another member's certificate and key, even from the right CA.
    run_cli("dataspace", "issue", dataspace, "supplier-b", "--out", tmp_path / "other")
    for name in ("key.pem", "cert.pem"):
        shutil.copyfile(tmp_path / "other" / name, space.provider.home / "tls" / name)
    assert not space.server.tls.reload()
    assert "is the certificate of member 'supplier-b'" in caplog.text
    assert served_certificate(space.server.port, space.grantee).serial_number == (
        before.serial_number
    )
    with space.peer() as peer:
        assert peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE).num_rows == 1


def test_a_new_ca_in_the_bundle_admits_its_members_without_a_restart(
    tmp_path: Path, rotating_space: Space
) -> None:
    space = rotating_space
    new_ca = tmp_path / "new-ca"
    create_dataspace_ca(new_ca, DATASPACE)  # the data space's CA being replaced
    assert run_cli("dataspace", "issue", new_ca, "supplier-a", "--out", tmp_path / "a") == 0
    bundle = (space.grantee.home / "tls" / "ca.pem").read_bytes() + (new_ca / "ca.pem").read_bytes()
    (tmp_path / "bundle.pem").write_bytes(bundle)
    identity = PeerIdentity.from_files(
        tmp_path / "a" / "cert.pem", tmp_path / "a" / "key.pem", tmp_path / "bundle.pem"
    )
    address = f"127.0.0.1:{space.server.port}"
    with Peer(address, identity) as peer, pytest.raises(PeerError, match="TLS handshake"):
        peer.catalog()
    (space.provider.home / "tls" / "ca.pem").write_bytes(bundle)
    assert space.server.tls.reload()
    with Peer(address, identity) as peer:
        assert [d.name for d in peer.catalog()] == ["part_defects"]
    with connect(space.server, space.grantee) as old_peer:  # the old CA's members still
        assert old_peer.catalog()


def _dns_names(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {
        *san.get_values_for_type(x509.DNSName),
        *map(str, san.get_values_for_type(x509.IPAddress)),
    }


def test_host_adds_to_the_default_names_unless_told_not_to(tmp_path: Path, dataspace: Path) -> None:
    args = ("dataspace", "issue", dataspace, "acme")
    assert run_cli(*args, "--out", tmp_path / "a", "--host", "acme.example") == 0
    assert _dns_names(tmp_path / "a" / "cert.pem") == {"localhost", "127.0.0.1", "acme.example"}
    out = tmp_path / "b"
    assert run_cli(*args, "--out", out, "--host", "acme.example", "--no-default-hosts") == 0
    assert _dns_names(out / "cert.pem") == {"acme.example"}
    assert run_cli(*args, "--out", tmp_path / "c", "--no-default-hosts") == 1
    assert not (tmp_path / "c" / "cert.pem").exists()


@pytest.mark.parametrize(
    ("name", "content", "words"),
    [
        ("cert.pem", b"not a certificate", "not usable PEM"),
        ("key.pem", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "PEM"),
        ("ca.pem", b"", "not usable PEM"),
    ],
)
def test_an_unreadable_file_keeps_the_ones_in_force(
    shared_space: Space, name: str, content: bytes, words: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = shared_space.provider.home / "tls" / name
    original = path.read_bytes()
    try:
        path.write_bytes(content)
        assert not shared_space.server.tls.reload()
        assert words in caplog.text
        with shared_space.peer() as peer:
            assert peer.catalog()
    finally:
        path.write_bytes(original)


def _issue(
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    *,
    ca: bool,
    name: str,
    dataspace: str = DATASPACE,
    starts: dt.timedelta = dt.timedelta(minutes=-5),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + starts)
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        san = [
            x509.UniformResourceIdentifier(f"spiffe://{dataspace}/member/carmaker"),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), key


def test_a_certificate_from_an_intermediate_ca_is_taken_with_its_chain(
    tmp_path: Path, rotating_space: Space
) -> None:
    space = rotating_space
    root, root_key = _issue(None, None, ca=True, name="root")  # a PKI with intermediates
    intermediate, intermediate_key = _issue(root, root_key, ca=True, name="intermediate")
    leaf, leaf_key = _issue(intermediate, intermediate_key, ca=False, name="carmaker")
    pem = serialization.Encoding.PEM
    tls = space.provider.home / "tls"
    bundle = (tls / "ca.pem").read_bytes() + root.public_bytes(pem)
    (tls / "ca.pem").write_bytes(bundle)
    (tls / "key.pem").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (tls / "cert.pem").write_bytes(leaf.public_bytes(pem) + intermediate.public_bytes(pem))
    assert space.server.tls.reload()
    (tmp_path / "bundle.pem").write_bytes(bundle)
    grantee = space.grantee.home / "tls"
    identity = PeerIdentity.from_files(
        grantee / "cert.pem", grantee / "key.pem", tmp_path / "bundle.pem"
    )
    with Peer(f"127.0.0.1:{space.server.port}", identity) as peer:
        # (Receipts are checked against a certificate the data space's CA issued directly
        # (receipt.py): with intermediates, use the catalog to see the handshake works.)
        assert [d.name for d in peer.catalog()] == ["part_defects"]
    # Out of order (the intermediate first), the set is refused.
    (tls / "cert.pem").write_bytes(intermediate.public_bytes(pem) + leaf.public_bytes(pem))
    assert not space.server.tls.reload()


@pytest.mark.parametrize(
    ("space_name", "starts", "words"),
    [
        ("other-space", dt.timedelta(minutes=-5), "a certificate of data space 'other-space'"),
        (DATASPACE, dt.timedelta(days=1), "is valid only from"),
    ],
    ids=["another data space", "not valid yet"],
)
def test_a_certificate_of_another_space_or_not_yet_valid_is_refused(
    rotating_space: Space,
    space_name: str,
    starts: dt.timedelta,
    words: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Both chain to a CA of the bundle and name the member: peers would still refuse them.
    space = rotating_space
    before = served_certificate(space.server.port, space.grantee)
    root, root_key = _issue(None, None, ca=True, name="root")
    leaf, leaf_key = _issue(
        root, root_key, ca=False, name="carmaker", dataspace=space_name, starts=starts
    )
    pem = serialization.Encoding.PEM
    tls = space.provider.home / "tls"
    (tls / "ca.pem").write_bytes((tls / "ca.pem").read_bytes() + root.public_bytes(pem))
    (tls / "key.pem").write_bytes(
        leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (tls / "cert.pem").write_bytes(leaf.public_bytes(pem))
    assert not space.server.tls.reload()
    assert words in caplog.text
    served = served_certificate(space.server.port, space.grantee)
    assert served.serial_number == before.serial_number
