"""Entry point of the `connector` command: wires the sub-command groups, maps errors to exits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from connector.cli import audit, data, dataspace, home, ops, peer, policy, receipt, serve
from connector.cli.logs import add_log_options, configure_logging
from connector.errors import ConnectorError
from connector.safetext import escaped

EXIT_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="connector",
        description="Federated data-sharing connector: share data under signed usage policies.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    add_log_options(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (dataspace, home, data, serve, ops, policy, peer, receipt, audit):
        group.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage)."""
    args = build_parser().parse_args(argv)
    configure_logging(args)
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
