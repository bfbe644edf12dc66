"""`connector backup` and `connector restore`: a member's home, copied while it serves."""

from __future__ import annotations

import argparse
from pathlib import Path

from connector.backup import make_backup
from connector.cli.common import add_home, settings_of
from connector.config import resolve_home
from connector.restore import restore_backup


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the backup and restore sub-commands."""
    backup = commands.add_parser(
        "backup",
        help="write a consistent copy of a home (data, policies, keys, audit log, quotas) to "
        "one file; works while the server runs",
    )
    add_home(backup)
    backup.add_argument(
        "--output",
        type=Path,
        required=True,
        metavar="FILE",
        help="the archive to write (a new file outside the home; it holds private keys)",
    )
    backup.set_defaults(run=_backup)

    restore = commands.add_parser(
        "restore", help="recreate a home from a backup in a new or empty folder"
    )
    restore.add_argument("archive", type=Path, metavar="FILE", help="made by `connector backup`")
    restore.add_argument(
        "--home", required=True, metavar="NEW", help="the home to create (new or empty folder)"
    )
    restore.set_defaults(run=_restore)


def _backup(args: argparse.Namespace) -> int:
    summary = make_backup(settings_of(args), args.output)
    print(
        f"backup {summary.path}: {summary.files} files, {summary.bytes} bytes, audit log of "
        f"{summary.audit_entries} entries (keep it as safe as the keys it holds)"
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    summary = restore_backup(args.archive, resolve_home(args.home))
    print(
        f"restored member {summary.member_id} into {summary.home}: {summary.files} files; "
        f"audit log {summary.audit_message}"
    )
    return 0
