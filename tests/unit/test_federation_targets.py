"""Resolving `--to` and `--all` through the member directory, before anyone is contacted."""

from __future__ import annotations

import re

import pytest

from connector.directory import Directory, MemberEntry
from connector.errors import DirectoryError
from connector.federation import Target, resolve_targets

DIRECTORY = Directory(
    "test-space",
    3,
    "2026-01-01T00:00:00+00:00",
    (
        MemberEntry("carmaker", "Car Maker", ("cm.example:50051",), ("oem",)),
        MemberEntry("sup-a", "A", ("a.example:50051", "a2.example:50051"), ("supplier",)),
        MemberEntry("sup-b", "B", ("b.example:50051",), ("supplier",)),
        MemberEntry("office", "Office", (), ("auditor",)),
    ),
)


def test_ids_roles_all_and_addresses_resolve_in_order_without_repeats() -> None:
    targets = resolve_targets(
        ["sup-b", "role:supplier", "10.0.0.1:50051"], directory=DIRECTORY, own_member="carmaker"
    )
    assert targets == [
        Target("sup-b", "b.example:50051", "sup-b"),
        Target("sup-a", "a.example:50051", "sup-a"),
        Target("10.0.0.1:50051", "10.0.0.1:50051"),  # no identity to check beyond the CA
    ]
    everyone = resolve_targets([], everyone=True, directory=DIRECTORY, own_member="sup-a")
    assert [t.label for t in everyone] == ["carmaker", "sup-b"]  # not itself, not office


@pytest.mark.parametrize(
    "specs, message",
    [
        (["ghost"], "ghost is not a member in the directory (version 3)"),
        (["role:logistics"], "no member has role logistics"),
        (["office"], "office lists no endpoint"),
        (["no-port:"], "invalid endpoint"),
        ([], "no member to ask"),
    ],
)
def test_what_cannot_be_resolved_is_named(specs: list[str], message: str) -> None:
    with pytest.raises(DirectoryError, match=re.escape(message)):
        resolve_targets(specs, directory=DIRECTORY)


def test_names_need_a_directory_addresses_do_not() -> None:
    with pytest.raises(DirectoryError, match="this home holds none"):
        resolve_targets(["sup-a"])
    with pytest.raises(DirectoryError, match="this home holds none"):
        resolve_targets([], everyone=True)
    assert resolve_targets(["127.0.0.1:1"]) == [Target("127.0.0.1:1", "127.0.0.1:1")]
