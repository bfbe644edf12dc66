"""An endpoint that presents another member's certificate gets nothing: a member id named
with --to is looked up in the signed directory, and the certificate presented there must
carry that member's SPIFFE id before any request is sent (over mTLS, real server)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import threading
from pathlib import Path

import pytest

from connector.config import load_settings
from connector.errors import WrongIdentity
from connector.federation import WRONG_IDENTITY, FederatedQuery, resolve_targets
from connector.federation_targets import Target, check_member_endpoint
from connector.held_directory import load_held
from connector.identity import create_dataspace_ca, issue_member_certificate
from tests.conftest import Space, run_cli

SQL = "SELECT plant, sum(defects) FROM part_defects GROUP BY plant"
PURPOSE = "quality-benchmarking"


@pytest.fixture(scope="module")
def lying_directory(shared_space: Space, dataspace: Path, module_dir: Path) -> Space:
    """supplier-a holds a directory that lists carmaker's endpoint for member supplier-b."""
    authority = module_dir / "authority"
    authority.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy2(dataspace / name, authority / name)
    endpoint = f"127.0.0.1:{shared_space.server.port}"
    for member_id in ("carmaker", "supplier-b"):
        args: list[str | Path] = ["dataspace", "member", "add", authority, member_id, "--name"]
        args += [member_id.title(), "--role", "oem"]
        assert run_cli(*args, "--endpoint", endpoint) == 0
    published = module_dir / "directory.json"
    assert run_cli("dataspace", "publish", authority, "--out", published) == 0
    assert run_cli("directory", "update", "--home", shared_space.grantee.home, published) == 0
    return shared_space


def _seq(space: Space) -> int:
    return space.server.provider.audit.head[0]


@pytest.mark.parametrize(
    "command",
    [
        ["query", "--purpose", PURPOSE, SQL],
        ["explain", "--purpose", PURPOSE, SQL],
        ["catalog"],
    ],
)
def test_a_spoofed_member_endpoint_gets_no_request_from_the_cli(
    lying_directory: Space, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    home = lying_directory.grantee.home
    before = _seq(lying_directory)
    assert run_cli(command[0], "--home", home, "--to", "supplier-b", *command[1:]) == 1
    err = capsys.readouterr().err
    assert "presented the certificate of spiffe://test-space/member/carmaker" in err
    assert "not of member supplier-b; nothing was sent" in err
    assert _seq(lying_directory) == before
    # The same endpoint named as the member it is: answered.
    assert run_cli(command[0], "--home", home, "--to", "carmaker", *command[1:]) == 0


def test_a_spoofed_member_in_a_federated_query_is_reported_and_gets_nothing(
    lying_directory: Space,
) -> None:
    settings = load_settings(lying_directory.grantee.home)
    directory = load_held(settings.home, settings.ca.read_bytes(), settings.dataspace)
    identity = lying_directory.grantee.identity()

    def entries_written(*names: str) -> tuple[dict[str, str], int]:
        before = _seq(lying_directory)
        targets = resolve_targets(list(names), directory=directory)
        result = FederatedQuery(identity, targets).run(SQL, PURPOSE)
        return {r.label: r.outcome for r in result.reports}, _seq(lying_directory) - before

    alone = entries_written("carmaker")
    both = entries_written("carmaker", "supplier-b")
    assert both[0] == {"carmaker": "answered", "supplier-b": WRONG_IDENTITY}
    # Nothing reached the connector on behalf of supplier-b: only carmaker's own requests.
    assert both[1] == alone[1] > 0


def test_the_catalog_names_the_provider_as_the_directory_does(
    lying_directory: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    home = lying_directory.grantee.home
    assert run_cli("catalog", "--home", home, "--to", "carmaker") == 0
    assert capsys.readouterr().out.startswith("Carmaker (carmaker), at 127.0.0.1:")


def test_a_role_names_several_members_and_explain_asks_one(
    lying_directory: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    home = lying_directory.grantee.home
    assert run_cli("catalog", "--home", home, "--to", "role:nothing") == 1
    assert "no member has role nothing" in capsys.readouterr().err
    assert run_cli("catalog", "--home", home, "--to", "role:oem") == 1
    assert "role:oem names 2 members; this command asks one" in capsys.readouterr().err


def test_an_endpoint_with_a_certificate_of_another_ca_is_a_wrong_identity(
    lying_directory: Space, tmp_path: Path
) -> None:
    create_dataspace_ca(tmp_path / "other-ca", "test-space")
    issue_member_certificate(tmp_path / "other-ca", "supplier-b", tmp_path / "fake")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "fake" / "cert.pem", tmp_path / "fake" / "key.pem")
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve_one() -> None:
            connection, _ = listener.accept()
            with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True):
                pass

        thread = threading.Thread(target=serve_one, daemon=True)
        thread.start()
        target = Target("supplier-b", f"127.0.0.1:{listener.getsockname()[1]}", "supplier-b")
        identity = lying_directory.grantee.identity()
        with pytest.raises(WrongIdentity, match="not issued by your data space's CA"):
            check_member_endpoint(target, identity, "test-space", 10)
        thread.join(10)
