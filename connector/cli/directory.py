"""`connector directory update` and `connector members`: the member directory a home holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from connector.cli.common import add_home, settings_of
from connector.config import Settings
from connector.directory import Directory, describe
from connector.errors import ConfigError
from connector.held_directory import load_held, update_held
from connector.safetext import escaped


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the directory sub-commands."""
    group = commands.add_parser("directory", help="take the data space's signed member directory")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    update = actions.add_parser(
        "update", help="hold a directory published by the authority (checked against the CA)"
    )
    add_home(update)
    update.add_argument("file", type=Path, metavar="FILE", help="the directory (FILE.jws beside)")
    update.set_defaults(run=_update)

    members = commands.add_parser("members", help="list the members of the directory held")
    add_home(members)
    members.set_defaults(run=_members)


def ca_pem(settings: Settings) -> bytes:
    """The data space's CA bundle of a home."""
    try:
        return settings.ca.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the CA bundle {settings.ca}: {exc.strerror}") from None


def held_directory(settings: Settings) -> Directory | None:
    """The directory the home holds, verified (None when none is held)."""
    return load_held(settings.home, ca_pem(settings), settings.dataspace)


def _update(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    update = update_held(settings.home, args.file, ca_pem(settings), settings.dataspace)
    directory = update.directory
    if not update.changed:
        print(escaped(f"directory version {directory.version} is already held; nothing changed"))
    else:
        before = (
            f" (was version {update.previous_version})"
            if update.previous_version is not None
            else ""
        )
        print(
            escaped(
                f"directory version {directory.version} of {directory.dataspace} held{before}: "
                f"{len(directory.members)} members"
            )
        )
    return 0


def _members(args: argparse.Namespace) -> int:
    directory = held_directory(settings_of(args))
    if directory is None:
        raise ConfigError(
            "this home holds no member directory: take the one the authority published with "
            "`connector directory update --home HOME FILE`"
        )
    for line in describe(directory.members):
        print(escaped(line))
    print(
        escaped(
            f"{len(directory.members)} members; directory version {directory.version}, "
            f"issued {directory.issued_at}"
        )
    )
    return 0
