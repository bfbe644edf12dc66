"""Arguments shared by several sub-commands."""

from __future__ import annotations

import argparse

from connector.config import HOME_ENV, Settings, load_settings, resolve_home


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
