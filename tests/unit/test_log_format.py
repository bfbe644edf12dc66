"""`--log-format json`: one JSON object a line, naming the request and member it belongs to."""

from __future__ import annotations

import json
import logging
import sys

from connector.audit_entry import AuditEntry
from connector.cli.logs import JsonFormatter
from connector.cli.main import build_parser
from connector.log_context import bind_request, current_request


def _record(message: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("connector.service", logging.INFO, __file__, 1, message, args, None)


def test_a_record_is_one_json_line_even_with_newlines_and_controls() -> None:
    line = JsonFormatter().format(_record("refused: %s", "a\nb\x1b[31m\u202e"))
    assert "\n" not in line and "\x1b" not in line
    fields = json.loads(line)
    assert fields["message"] == "refused: a\nb\x1b[31m\u202e"
    assert (fields["level"], fields["logger"]) == ("info", "connector.service")
    assert "request_id" not in fields and "member" not in fields


def test_lines_name_the_request_bound_to_the_thread_and_its_member_once_known() -> None:
    entry = AuditEntry("query", request_id="r-1")
    bind_request(entry)
    try:
        assert json.loads(JsonFormatter().format(_record("x")))["request_id"] == "r-1"
        entry.member_id = "supplier-a"  # learnt after the line above
        fields = json.loads(JsonFormatter().format(_record("y")))
        assert (fields["request_id"], fields["member"]) == ("r-1", "supplier-a")
    finally:
        bind_request(None)
    assert current_request() == ("", "")


def test_an_exception_stays_inside_the_object() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = _record("failed")
        record.exc_info = sys.exc_info()
    fields = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in fields["exception"]


def test_text_is_the_default_and_serve_takes_the_options_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["datasets"]).log_format == "text"
    args = parser.parse_args(["serve", "--log-format", "json", "--log-level", "warning"])
    assert (args.log_format, args.log_level) == ("json", "warning")
    args = parser.parse_args(["--log-format", "json", "serve"])
    assert args.log_format == "json"
