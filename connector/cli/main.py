"""Entry point of the `connector` command: wires the sub-command groups, maps errors to exits."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from connector.errors import ConnectorError
from connector.safetext import escape_log_lines, escaped

EXIT_ERROR = 1

# The module under connector.cli that registers each command, in the order `--help` lists
# them. A command loads only its own module: loading all of them (the server, the policy
# engine, DuckDB, OpenDP) cost each call about 0.6 s before it did anything.
COMMAND_MODULES: dict[str, str] = {
    "dataspace": "dataspace",
    "init": "home",
    "ingest": "data",
    "datasets": "data",
    "serve": "serve",
    "policy": "policy",
    "catalog": "peer",
    "query": "peer",
    "explain": "peer",
    "receipt": "receipt",
    "audit": "audit",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with `command`'s module registered (every module when None)."""
    parser = argparse.ArgumentParser(
        prog="connector",
        description="Federated data-sharing connector: share data under signed usage policies.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()
    for name in dict.fromkeys(wanted):
        importlib.import_module(f"connector.cli.{name}").register(commands)
    return parser


def named_command(argv: Sequence[str]) -> str | None:
    """The command the arguments name (the first word that is not an option), if any."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage)."""
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(named_command(words)).parse_args(words)
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
