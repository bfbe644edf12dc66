"""The signed member directory: the authority edits and publishes it, a home takes it only
when it is signed by the data space's CA and not older than the one held."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from connector import jws
from connector.directory import Directory
from connector.held_directory import held_path
from connector.identity import create_dataspace_ca, load_private_key
from tests.conftest import DATASPACE, Member, run_cli


@pytest.fixture
def authority(tmp_path: Path, dataspace: Path) -> Path:
    """A copy of the session's CA folder, so that its directory draft is this test's own."""
    folder = tmp_path / "authority"
    folder.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy2(dataspace / name, folder / name)
    return folder


def publish(authority: Path, out: Path) -> Path:
    assert run_cli("dataspace", "publish", authority, "--out", out) == 0
    return out


def add(authority: Path, member_id: str, *extra: str) -> None:
    args: list[str | Path] = [
        "dataspace",
        "member",
        "add",
        authority,
        member_id,
        "--endpoint",
        "127.0.0.1:1",
    ]
    assert run_cli(*args, *extra) == 0


def test_authority_adds_lists_removes_and_publishes_versions(
    authority: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    add(authority, "carmaker", "--role", "oem", "--country", "DE", "--name", "Car Maker AG")
    add(authority, "supplier-a", "--role", "supplier")
    add(authority, "supplier-b", "--role", "supplier")
    assert run_cli("dataspace", "member", "remove", authority, "supplier-b") == 0
    capsys.readouterr()
    assert run_cli("dataspace", "member", "list", authority) == 0
    listed = capsys.readouterr().out
    assert "carmaker  Car Maker AG" in listed and "country DE" in listed
    assert "supplier-b" not in listed
    first = json.loads(publish(authority, tmp_path / "d1.json").read_bytes())
    second = json.loads(publish(authority, tmp_path / "d2.json").read_bytes())
    assert (first["version"], second["version"]) == (1, 2)
    assert [m["id"] for m in second["members"]] == ["carmaker", "supplier-a"]
    assert second["dataspace"] == DATASPACE
    assert (tmp_path / "d2.json.jws").read_text().count(".") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--endpoint", "no-port"], "invalid endpoint"),
        (["--endpoint", "h:1", "--role", "Bad Role"], "invalid role"),
        (["--endpoint", "h:1", "--country", "Germany"], "invalid country"),
    ],
)
def test_bad_member_entries_are_refused_with_the_rule(
    authority: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("dataspace", "member", "add", authority, "m1", *args) == 1
    assert message in capsys.readouterr().err
    assert run_cli("dataspace", "member", "add", authority, "Not_An_Id", "--endpoint", "h:1") == 1
    assert run_cli("dataspace", "member", "remove", authority, "nobody") == 1


def test_a_home_takes_a_directory_and_lists_its_members(
    authority: Path, make_member: Callable[[str], Member], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    home = make_member("supplier-a").home
    assert run_cli("members", "--home", home) == 1
    assert "holds no member directory" in capsys.readouterr().err
    add(authority, "carmaker", "--role", "oem")
    one = publish(authority, tmp_path / "one.json")
    assert run_cli("directory", "update", "--home", home, one) == 0
    assert run_cli("directory", "update", "--home", home, one) == 0
    assert "already held" in capsys.readouterr().out
    add(authority, "supplier-a", "--role", "supplier")
    two = publish(authority, tmp_path / "two.json")
    assert run_cli("directory", "update", "--home", home, two) == 0
    assert "(was version 1)" in capsys.readouterr().out
    assert run_cli("members", "--home", home) == 0
    out = capsys.readouterr().out
    assert "carmaker" in out and "supplier-a" in out and "directory version 2" in out


def refused(home: Path, file: Path, capsys: pytest.CaptureFixture[str]) -> str:
    before = held_path(home).read_bytes()
    assert run_cli("directory", "update", "--home", home, file) == 1
    assert held_path(home).read_bytes() == before  # the one held stays in force
    return capsys.readouterr().err


def test_bad_directories_are_refused_and_the_held_one_stays(
    authority: Path, make_member: Callable[[str], Member], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    home = make_member("supplier-a").home
    add(authority, "carmaker", "--role", "oem")
    old = publish(authority, tmp_path / "old.json")
    new = publish(authority, tmp_path / "new.json")
    assert run_cli("directory", "update", "--home", home, new) == 0
    capsys.readouterr()
    assert "older than version 2 held" in refused(home, old, capsys)

    tampered = tmp_path / "tampered.json"
    tampered.write_bytes(new.read_bytes().replace(b'"oem"', b'"supplier"'))
    shutil.copy2(new.with_name(new.name + ".jws"), tampered.with_name("tampered.json.jws"))
    assert "does not verify against your data space's CA" in refused(home, tampered, capsys)

    unsigned = tmp_path / "unsigned.json"
    unsigned.write_bytes(new.read_bytes())
    assert "is not signed" in refused(home, unsigned, capsys)

    other_ca = tmp_path / "other"
    create_dataspace_ca(other_ca, DATASPACE)
    add(other_ca, "carmaker", "--role", "supplier")
    for _ in range(3):
        foreign = publish(other_ca, tmp_path / "foreign.json")
    assert "does not verify against your data space's CA" in refused(home, foreign, capsys)

    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    garbage.with_name("garbage.json.jws").write_text("x.y")
    assert "malformed" in refused(home, garbage, capsys)

    # Signed by the right CA, but the held version with other content, or not a directory.
    key = load_private_key(authority / "ca.key")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    for name, data in (
        ("reused.json", Directory(DATASPACE, 2, "2026-01-01T00:00:00+00:00").to_json()),
        ("list.json", b"[]"),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        path.with_name(name + ".jws").write_text(jws.sign_es256(data, key, detached=True))
    assert "the version held, with other content" in refused(home, tmp_path / "reused.json", capsys)
    assert "not a member directory" in refused(home, tmp_path / "list.json", capsys)


def test_a_member_certificate_in_the_ca_bundle_cannot_sign_a_directory(
    authority: Path, make_member: Callable[[str], Member], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # A bundle that also holds a member's own certificate (misconfiguration, or several
    # spaces in one bundle) must not let that member sign itself roles.
    home = make_member("supplier-a").home
    add(authority, "carmaker", "--role", "oem")
    assert (
        run_cli("directory", "update", "--home", home, publish(authority, tmp_path / "d.json")) == 0
    )
    bundle = home / "tls" / "ca.pem"
    bundle.write_bytes(bundle.read_bytes() + (home / "tls" / "cert.pem").read_bytes())
    key = load_private_key(home / "tls" / "key.pem")
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    data = Directory(DATASPACE, 7, "2026-01-01T00:00:00+00:00").to_json()
    path = tmp_path / "self-signed.json"
    path.write_bytes(data)
    path.with_name(path.name + ".jws").write_text(jws.sign_es256(data, key, detached=True))
    assert "does not verify against your data space's CA" in refused(home, path, capsys)


def test_a_held_directory_that_no_longer_verifies_still_stops_a_rollback(
    authority: Path, make_member: Callable[[str], Member], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # Version 1 gave supplier-b the role oem; version 2 withdrew it.
    home = make_member("supplier-a").home
    add(authority, "supplier-b", "--role", "oem")
    old = publish(authority, tmp_path / "old.json")
    assert run_cli("dataspace", "member", "remove", authority, "supplier-b") == 0
    new = publish(authority, tmp_path / "new.json")
    assert run_cli("directory", "update", "--home", home, new) == 0
    held = json.loads(held_path(home).read_text())
    held["signature"] = held["signature"][:-4] + "AAAA"  # damaged: no longer verifies
    held_path(home).write_text(json.dumps(held))
    capsys.readouterr()
    assert "older than version 2 held" in refused(home, old, capsys)
    assert run_cli("directory", "update", "--home", home, new) == 0  # the same one mends it
    assert run_cli("members", "--home", home) == 0
    held_path(home).write_text("not json")
    err = refused(home, old, capsys)
    assert "cannot be read" in err and "move that file away" in err
    held_path(home).unlink()
    assert run_cli("directory", "update", "--home", home, old) == 0
