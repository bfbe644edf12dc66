"""The one escaping function: nothing a peer or a file controls drives a terminal or a log."""

from __future__ import annotations

import logging

import pytest

from connector.safetext import EscapingFormatter, escaped

HOSTILE = [
    "\x1b]0;pwned\x07",  # OSC: retitle the terminal
    "\x1b[2J\x1b[H",  # CSI: clear the screen
    "a\nFORGED 2026-01-01 INFO connector: answered",  # a forged log or audit line
    "\r\x08\x7f\x85\x9b",  # carriage return, backspace, DEL, NEL, C1 CSI
    "evil\u202egnp.exe",  # bidi override
    "\u2066\u2067\u2068\u2069\u200e\u200f\u061c",  # bidi isolates and marks
    "zero\u200bwidth\ufeff",  # zero-width space, BOM
    "line\u2028sep\u2029",  # line and paragraph separators
    "lone\ud800surrogate",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_nothing_hidden_survives(text: str) -> None:
    shown = escaped(text)
    assert shown.isprintable(), shown
    assert shown.isascii() or all(c.isprintable() for c in shown)


def test_plain_text_and_letters_are_unchanged() -> None:
    text = "SELECT plant, \"Größe\" FROM part_defects WHERE plant = 'Łódź' -- 東京"
    assert escaped(text) == text


def test_escapes_are_unambiguous() -> None:
    # A literal backslash sequence cannot pass for an escaped control character.
    assert escaped("\\x1b") != escaped("\x1b")
    assert escaped("\\x1b") == "\\\\x1b"


def test_limit_shows_how_much_was_left_out() -> None:
    assert escaped("abcdef", limit=2) == "ab...(4 more characters)"


def test_log_records_stay_one_line() -> None:
    formatter = EscapingFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "refused: %s", ("a\nINFO forged\x1b[31m",), None
    )
    line = formatter.format(record)
    assert "\n" not in line and "\x1b" not in line
    assert line == "INFO refused: a\\nINFO forged\\x1b[31m"
