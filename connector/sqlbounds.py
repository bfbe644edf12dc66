"""A cheap, linear scan of a peer's SQL before DuckDB's parser sees it.

DuckDB's parser is fast on ordinary SQL but slow on some shapes: its error path grows worse
than quadratically with bracket nesting (an unclosed run of 10,000 '(' took 46 s), and its
time grows with the number of tokens. This scan bounds the length, the tokens and the bracket
nesting, and refuses unbalanced brackets and text DuckDB could not read, so that every query
that reaches the parser is parsed in a few tens of milliseconds at most.

The scan follows DuckDB's lexer (PostgreSQL's, with backquoted identifiers) for the parts
that can hide brackets: 'strings' (with '' inside), E'strings' (with backslash escapes),
"identifiers" and `identifiers` (doubled quotes inside), $tag$ dollar-quoted strings $tag$,
-- comments to the end of a line and nested /* block comments */.
"""

from __future__ import annotations

import re

from connector.errors import QueryRejected

DEFAULT_MAX_LENGTH = 100_000
# Measured on DuckDB 2.0 (see tests/fuzz/test_fuzz_sqlbounds.py and the bench figures in
# the issue-18 report): at these bounds the slowest accepted query parses in about 30 ms.
MAX_TOKENS = 3_000
MAX_BRACKET_DEPTH = 64

_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {")": "(", "]": "[", "}": "{"}
_IDENT_CHAR = r"A-Za-z0-9_\x80-\U0010ffff"
# One lexical unit at a time; group names say what was found. Order matters: E'...' before
# identifiers (E is a letter), comments before operators ('-' and '/' are operators).
_TOKEN = re.compile(
    rf"""
    (?P<space>[ \t\n\r\f\v]+)
  | (?P<line_comment>--[^\n\r]*)
  | (?P<block_comment>/\*)
  | (?P<escape_string>[eE]')
  | (?P<string>')
  | (?P<quoted>["`])
  | (?P<dollar>\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$)
  | (?P<word>[A-Za-z_\x80-\U0010ffff][{_IDENT_CHAR}$]*)
  | (?P<number>[0-9][0-9A-Za-z_.]*|\.[0-9][0-9A-Za-z_]*)
  | (?P<bracket>[()\[\]{{}}])
  | (?P<operator>(?:(?!--|/\*)[-+*/<>=~!@#%^&|?])+)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
# Unrolled loops ([^']*(?:''[^']*)*): one regex step per run of characters, not per character.
_STRING_BODY = re.compile(r"[^']*(?:''[^']*)*'")
_ESCAPE_STRING_BODY = re.compile(r"[^'\\]*(?:(?:\\.|'')[^'\\]*)*'", re.DOTALL)
_QUOTED_BODY = {'"': re.compile(r'[^"]*(?:""[^"]*)*"'), "`": re.compile(r"[^`]*(?:``[^`]*)*`")}
_COMMENT_MARK = re.compile(r"/\*|\*/")


def check_query_bounds(
    sql: str,
    max_length: int = DEFAULT_MAX_LENGTH,
    *,
    max_tokens: int = MAX_TOKENS,
    max_depth: int = MAX_BRACKET_DEPTH,
) -> None:
    """Refuse SQL that is too long, too deep, unbalanced or not text, before it is parsed."""
    if len(sql) > max_length:
        raise QueryRejected(
            f"the query is longer than {max_length} characters; send a shorter query"
        )
    _check_text(sql)
    _Scan(sql, max_tokens, max_depth).run()


def _check_text(sql: str) -> None:
    try:
        sql.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise QueryRejected(
            "the query contains a character that is not valid Unicode text (a lone surrogate)",
            position=exc.start,
        ) from None
    nul = sql.find("\x00")
    if nul >= 0:
        raise QueryRejected("the query contains a NUL character", position=nul)


class _Scan:
    """One pass over the text: counts tokens and keeps the stack of open brackets."""

    def __init__(self, sql: str, max_tokens: int, max_depth: int) -> None:
        self.sql = sql
        self.max_tokens = max_tokens
        self.max_depth = max_depth
        self.tokens = 0
        self.open: list[tuple[str, int]] = []

    def run(self) -> None:
        position = 0
        while position < len(self.sql):
            found = _TOKEN.match(self.sql, position)
            if found is None:  # pragma: no cover - the last alternative matches any character
                raise QueryRejected("the query could not be read", position=position)
            kind = found.lastgroup
            end = found.end()
            if kind == "space":
                position = end
                continue
            # Comments count too: a query of 30,000 empty comments must not be a cheap loop.
            self._count(position)
            if kind == "block_comment":
                end = self._comment_end(position)
            if kind == "escape_string":
                end = self._body_end(_ESCAPE_STRING_BODY, end, position, "string literal")
            elif kind == "string":
                end = self._body_end(_STRING_BODY, end, position, "string literal")
            elif kind == "quoted":
                body = _QUOTED_BODY[found.group()]
                end = self._body_end(body, end, position, "quoted identifier")
            elif kind == "dollar":
                end = self._dollar_end(found.group(), end, position)
            elif kind == "bracket":
                self._bracket(found.group(), position)
            position = end
        if self.open:
            bracket, where = self.open[-1]
            raise QueryRejected(
                f"the bracket '{bracket}' is never closed; close it with '{_OPENERS[bracket]}'",
                position=where,
            )

    def _count(self, position: int) -> None:
        self.tokens += 1
        if self.tokens > self.max_tokens:
            raise QueryRejected(
                f"the query has more than {self.max_tokens} words, numbers, symbols and "
                "comments; "
                "send a shorter query (or several)",
                position=position,
            )

    def _bracket(self, bracket: str, position: int) -> None:
        if bracket in _OPENERS:
            self.open.append((bracket, position))
            if len(self.open) > self.max_depth:
                raise QueryRejected(
                    f"brackets are nested more than {self.max_depth} deep; "
                    "write the query with less nesting",
                    position=position,
                )
            return
        expected = _CLOSERS[bracket]
        if not self.open:
            raise QueryRejected(
                f"the bracket '{bracket}' closes nothing; remove it", position=position
            )
        opener, where = self.open.pop()
        if opener != expected:
            raise QueryRejected(
                f"the bracket '{bracket}' does not match the '{opener}' opened at "
                f"character {where + 1}",
                position=position,
            )

    def _body_end(self, body: re.Pattern[str], start: int, position: int, what: str) -> int:
        found = body.match(self.sql, start)
        if found is None:
            raise QueryRejected(f"the {what} is never closed", position=position)
        return found.end()

    def _dollar_end(self, delimiter: str, start: int, position: int) -> int:
        close = self.sql.find(delimiter, start)
        if close < 0:
            raise QueryRejected(
                f"the dollar-quoted string {delimiter} is never closed", position=position
            )
        return close + len(delimiter)

    def _comment_end(self, position: int) -> int:
        # Block comments nest in DuckDB's lexer: /* a /* b */ c */ is one comment.
        depth = 0
        for mark in _COMMENT_MARK.finditer(self.sql, position):
            depth += 1 if mark.group() == "/*" else -1
            if depth == 0:
                return mark.end()
            if depth > self.max_depth:
                raise QueryRejected(
                    f"comments are nested more than {self.max_depth} deep", position=mark.start()
                )
        raise QueryRejected("the /* comment is never closed with */", position=position)
