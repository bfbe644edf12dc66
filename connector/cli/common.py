"""Arguments shared by several sub-commands."""

from __future__ import annotations

import argparse
import sys

from connector.config import HOME_ENV, Settings, load_settings, resolve_home
from connector.errors import ConnectorError
from connector.ingest_client import home_datasets
from connector.safetext import escaped
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
    try:
        return {info.name: info for info in home_datasets(settings)}
    except ConnectorError as error:
        print(escaped(f"note: datasets and columns not checked: {error}"), file=sys.stderr)
        return None
