"""Arguments shared by several sub-commands."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from connector.config import HOME_ENV, Settings, load_settings, resolve_home
from connector.errors import ConnectorError, IdentityError
from connector.identity import DEFAULT_HOSTS
from connector.safetext import escaped

if TYPE_CHECKING:
    from connector.store import DatasetInfo


def add_home(parser: argparse.ArgumentParser) -> None:
    """--home HOME, defaulting to $CONNECTOR_HOME, else the current folder."""
    parser.add_argument(
        "--home",
        metavar="HOME",
        help=f"the member's home folder (default: ${HOME_ENV}, else the current folder)",
    )


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings of the home folder the arguments name."""
    return load_settings(resolve_home(args.home))


def datasets_or_note(settings: Settings) -> dict[str, DatasetInfo] | None:
    """The home's datasets, to check policies against (None, with a note, when unreadable);
    from the running server when there is one."""
    from connector.ingest_client import home_datasets  # here: peers' commands need no DuckDB

    try:
        return {info.name: info for info in home_datasets(settings)}
    except ConnectorError as error:
        print(escaped(f"note: datasets and columns not checked: {error}"), file=sys.stderr)
        return None


def add_hosts(parser: argparse.ArgumentParser) -> None:
    """--host HOST (repeated) and --no-default-hosts: the names a member certificate carries."""
    parser.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="HOST",
        help=f"DNS name or IP the member serves on, added to {', '.join(DEFAULT_HOSTS)} "
        "(repeat for several)",
    )
    parser.add_argument(
        "--no-default-hosts",
        action="store_true",
        help=f"leave {', '.join(DEFAULT_HOSTS)} out: only the --host names",
    )


def hosts_of(args: argparse.Namespace) -> tuple[str, ...]:
    """The certificate's host names: the defaults (unless left out) and each --host, once."""
    hosts = [*(() if args.no_default_hosts else DEFAULT_HOSTS), *args.host]
    if not hosts:
        raise IdentityError("--no-default-hosts needs at least one --host NAME")
    return tuple(dict.fromkeys(hosts))
