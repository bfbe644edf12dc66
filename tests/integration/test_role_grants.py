"""Policies granting to a role: resolved by the server through the member directory it
holds, nobody without one, and lint names grantees the directory does not know."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from connector.errors import PermissionDenied
from connector.server import RunningServer
from tests.conftest import Member, Space, connect, policy_text, run_cli

ROLE_POLICY = policy_text(
    "role-grant", members="[]", purposes="[role-check]", columns="[plant, defects]"
).replace("grantees: {members: []}", "grantees: {roles: [supplier]}")


def published_directory(dataspace: Path, folder: Path, roles: dict[str, str]) -> Path:
    """A directory signed by the session's CA listing member -> role."""
    authority = folder / "authority"
    authority.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy2(dataspace / name, authority / name)
    for member_id, role in roles.items():
        args: list[str | Path] = [authority, member_id, "--endpoint", "127.0.0.1:1", "--role", role]
        assert run_cli("dataspace", "member", "add", *args) == 0
    out = folder / "directory.json"
    assert run_cli("dataspace", "publish", authority, "--out", out) == 0
    return out


def allowed(server: RunningServer, member: Member) -> bool:
    with connect(server, member) as peer:
        try:
            peer.query("SELECT plant, sum(defects) FROM part_defects GROUP BY plant", "role-check")
        except PermissionDenied:
            return False
    return True


def test_a_role_grant_reaches_the_directory_s_members_of_that_role_only(
    space: Space, dataspace: Path, tmp_path: Path
) -> None:
    space.provider.write_policy("role.yaml", ROLE_POLICY)
    space.server.provider.policies.reload()
    # No directory held: the role grants nobody (fail closed).
    assert not allowed(space.server, space.outsider)
    directory = published_directory(
        dataspace, tmp_path, {"supplier-b": "supplier", "supplier-a": "oem"}
    )
    assert run_cli("directory", "update", "--home", space.provider.home, directory) == 0
    # What the server's watcher does every few seconds, done now (unless it just did): the
    # registry sees that the held directory changed and resolves the role again.
    space.server.provider.policies.reload_if_changed()
    assert allowed(space.server, space.outsider)
    assert not allowed(space.server, space.grantee)


def test_lint_warns_of_grantees_the_directory_does_not_know(
    make_member: Callable[[str], Member], dataspace: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    home = make_member("carmaker")
    draft = tmp_path / "draft.yaml"
    draft.write_text(
        policy_text("p", members="[supplier-a, suplier-b]").replace(
            "grantees: {members: [supplier-a, suplier-b]}",
            "grantees: {members: [supplier-a, suplier-b], roles: [supplier, logistics]}",
        )
    )
    run_cli("policy", "lint", "--home", home.home, draft)  # errors: no data in this home
    assert "holds no member directory" in capsys.readouterr().err
    directory = published_directory(
        dataspace, tmp_path, {"supplier-a": "supplier", "supplier-b": "supplier"}
    )
    assert run_cli("directory", "update", "--home", home.home, directory) == 0
    capsys.readouterr()
    run_cli("policy", "lint", "--home", home.home, draft)
    out = capsys.readouterr()
    text = out.out + out.err
    assert "grantee suplier-b is not a member" in text and "did you mean 'supplier-b'" in text
    assert "has role logistics" in text
    assert "grantee supplier-a" not in text and "has role supplier" not in text


def test_explain_and_diff_name_the_roles_a_policy_grants_to(
    make_member: Callable[[str], Member], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = make_member("carmaker").home
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(ROLE_POLICY)
    new.write_text(ROLE_POLICY.replace("roles: [supplier]", "roles: [supplier, oem]"))
    assert run_cli("policy", "explain", "--home", home, old) == 0
    assert "every member with role supplier in the data space's signed" in capsys.readouterr().out
    run_cli("policy", "diff", old, new)
    assert "role oem added" in capsys.readouterr().out
