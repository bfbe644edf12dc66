"""How the `connector` command logs: `--log-format text|json` and `--log-level`.

Only the command line configures logging (library modules only get a named logger). JSON
is one object a line, for log shippers: time, level, logger, message, and the request id
and member of the peer request the line belongs to, when there is one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys

from connector.log_context import current_request
from connector.safetext import escape_log_lines

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (json escapes every control character)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON object."""
        fields: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id, member = current_request()
        if request_id:
            fields["request_id"] = request_id
        if member:
            fields["member"] = member
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack"] = self.formatStack(record.stack_info)
        return json.dumps(fields, ensure_ascii=True, default=str)


def add_log_options(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """--log-format and --log-level; on a sub-command they override the top-level ones."""
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text" if top_level else argparse.SUPPRESS,
        help="text lines (the default) or one JSON object a line, with request id and member",
    )
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        default=None if top_level else argparse.SUPPRESS,
        help="the least important messages logged (default: info; -v means debug)",
    )


def configure_logging(args: argparse.Namespace) -> None:
    """Send log records to stderr in the format and from the level the arguments ask for."""
    level = args.log_level or ("debug" if getattr(args, "verbose", False) else "info")
    handler = logging.StreamHandler(sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    if args.log_format != "json":
        escape_log_lines()
