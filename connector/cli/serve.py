"""`connector serve`: run the server in the foreground."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from connector.cli.common import add_home, settings_of
from connector.cli.logs import add_log_options
from connector.foreground import serve_forever


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the serve sub-command."""
    serve = commands.add_parser(
        "serve", help="answer peers over mutual TLS until SIGTERM/SIGINT (SIGHUP reloads policies)"
    )
    add_home(serve)
    serve.add_argument("--listen", metavar="HOST:PORT", help="overrides [server] listen")
    add_log_options(serve, top_level=False)
    serve.add_argument(
        "--flight-listen",
        metavar="HOST:PORT",
        help='overrides [flight] listen (the Arrow Flight SQL port; "" turns it off)',
    )
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    if not serve_forever(settings_of(args), args.listen, args.flight_listen):
        # pyarrow would wait at exit for a Flight call it cannot cancel (a peer that does not
        # read its answer); the store, audit log and quotas are closed, so end here.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return 0
