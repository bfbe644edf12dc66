"""Entry point of the `connector` command: wires the sub-command groups, maps errors to exits."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from connector import __version__
from connector.cli import audit, data, dataspace, home, peer, policy, receipt, serve
from connector.errors import ConnectorError
from connector.safetext import escape_log_lines, escaped

EXIT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="connector",
        description="Federated data-sharing connector: share data under signed usage policies.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument(
        "--version", action="version", version=f"connector {__version__}", help="show the version"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (dataspace, home, data, serve, policy, peer, receipt, audit):
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    escape_log_lines()
    try:
        status: int = args.run(args)
    except ConnectorError as error:
        print(f"connector: error: {escaped(error)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
