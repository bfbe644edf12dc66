"""Entry point of the `connector` command: wires the sub-command groups, maps errors to exits."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from connector import __version__
from connector.cli.logs import add_log_options, configure_logging
from connector.errors import ConnectorError
from connector.safetext import escaped

EXIT_ERROR = 1

# The module under connector.cli that registers each command, in the order `--help` lists
# them. A command loads only its own module: loading all of them (the server, the policy
# engine, DuckDB, OpenDP) cost each call about 0.6 s before it did anything.
COMMAND_MODULES: dict[str, str] = {
    "dataspace": "dataspace",
    "directory": "directory",
    "members": "directory",
    "init": "home",
    "ingest": "data",
    "datasets": "data",
    "serve": "serve",
    "backup": "ops",
    "restore": "ops",
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
    _add_top_level_options(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = [COMMAND_MODULES[command]] if command in COMMAND_MODULES else COMMAND_MODULES.values()
    for name in dict.fromkeys(wanted):
        importlib.import_module(f"connector.cli.{name}").register(commands)
    return parser


def named_command(argv: Sequence[str]) -> str | None:
    """The command the arguments name (the first word that is neither an option nor the
    value of one), if any; None also when the options are wrong (the full parser says why)."""
    options = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    _add_top_level_options(options)
    try:
        _, rest = options.parse_known_args(argv)
    except argparse.ArgumentError:
        return None
    return next((word for word in rest if not word.startswith("-")), None)


def _add_top_level_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument(
        "--version", action="version", version=f"connector {__version__}", help="show the version"
    )
    add_log_options(parser, top_level=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 error, 2 usage)."""
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(named_command(words)).parse_args(words)
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
