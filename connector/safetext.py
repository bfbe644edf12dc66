"""Text a peer or a file controls, made safe to show on a terminal or in a log line.

One function, `escaped`, is used wherever such text is printed or logged: control
characters, newlines, ANSI escape sequences (ESC), bidi overrides, zero-width and other
format characters, line separators and lone surrogates become visible backslash escapes,
so nobody can forge a line, retitle a terminal or reorder what an operator reads. The
JSON Lines audit file keeps the exact text (JSON escapes it on its own).
"""

from __future__ import annotations

import logging
import re
import unicodedata

# Categories that do not print as themselves: controls, format (bidi, zero-width), line and
# paragraph separators, surrogates, private use and unassigned code points.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# Printable ASCII except the backslash never needs a look-up.
_NOT_PLAIN = re.compile(r"[^\x20-\x5b\x5d-\x7e]")


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    short = _SHORT.get(char)
    if short is not None:
        return short
    if unicodedata.category(char) not in _HIDDEN_CATEGORIES:
        return char
    point = ord(char)
    if 0xDC80 <= point <= 0xDCFF:  # a byte that was not UTF-8, decoded with surrogateescape
        return f"\\x{point - 0xDC00:02x}"
    if point <= 0xFF:
        return f"\\x{point:02x}"
    if point <= 0xFFFF:
        return f"\\u{point:04x}"
    return f"\\U{point:08x}"


def escaped(text: object, limit: int | None = None) -> str:
    """text with every character that does not print as itself shown as an escape.

    With limit, at most that many characters of the text are shown, followed by how many
    were left out.
    """
    value = text if isinstance(text, str) else str(text)
    rest = 0
    if limit is not None and len(value) > limit:
        value, rest = value[:limit], len(value) - limit
    shown = _NOT_PLAIN.sub(_escape_one, value)
    return f"{shown}...({rest} more characters)" if rest else shown


class EscapingFormatter(logging.Formatter):
    """A log formatter that escapes each message, and each line of a traceback."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging API)
        """The record formatted with its message escaped (so one record is one line)."""
        record.message = escaped(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: logging._SysExcInfoType) -> str:  # noqa: N802
        """The traceback, each of its lines escaped (an exception text may quote a peer)."""
        return "\n".join(escaped(line) for line in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        """The stack, each of its lines escaped."""
        return "\n".join(escaped(line) for line in stack_info.splitlines())


def escape_log_lines(logger: logging.Logger | None = None) -> None:
    """Make every handler of logger (default: the root logger) escape what it writes."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        current = handler.formatter
        handler.setFormatter(
            EscapingFormatter(
                current._fmt if current else None,
                current.datefmt if current else None,
            )
        )
