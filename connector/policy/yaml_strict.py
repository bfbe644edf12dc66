"""Strict reading of a policy's YAML: every value read under rules that leave no doubt.

The reader walks composed nodes and names the file and line in every error; tags, anchors,
aliases and deep nesting are refused before anything is composed, and plain scalars that
YAML 1.1 would read with another meaning are refused with the spelling to use instead.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path
from typing import Any

import yaml

from connector.errors import PolicyError
from connector.names import COLUMN_NAME, DATASET_NAME, MEMBER_ID, POLICY_ID, PURPOSE

ANY_TEXT = re.compile(r"^[^\x00-\x08\x0b-\x1f\x7f]{1,2000}$")
# A policy is at most four levels deep; anything far deeper is an attack on the YAML composer,
# which recurses once per level (5,000 levels raised RecursionError).
MAX_YAML_DEPTH = 16
MAX_WHOLE_NUMBER = 2**63 - 1

# Strict scalar rules for plain (unquoted) values: YAML 1.2 core, plus dates, and nothing a
# YAML 1.1 reader would silently read with another meaning (024 as 20, 1:30 as 90, no as false).
_NULL = re.compile(r"~|null|Null|NULL")
_TRUE = re.compile(r"true|True|TRUE")
_FALSE = re.compile(r"false|False|FALSE")
_YAML11_BOOL = re.compile(r"y|Y|yes|Yes|YES|n|N|no|No|NO|on|On|ON|off|Off|OFF")
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?")
_SPECIAL_FLOAT = re.compile(r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")
_LEADING_ZERO = re.compile(r"[-+]?0[0-9_]+")
_BASED_INT = re.compile(r"[-+]?0[xXoObB][0-9a-fA-F_]*")
_SEXAGESIMAL = re.compile(r"[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?")
_UNDERSCORED = re.compile(r"(?=[^_]*_)[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?")
_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_DATETIME = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,6})?"
    r"(?:[ \t]*(Z|z|[-+][0-9]{2}:[0-9]{2}))?"
)
_DATE_LIKE = re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt \t].*)?", re.DOTALL)


class PolicyReader:
    """Walks the composed YAML nodes of one file, keeping line numbers for every message."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, node: yaml.Node | None, message: str) -> PolicyError:
        line = node.start_mark.line + 1 if node is not None else None
        return PolicyError(message, path=str(self.path), line=line)

    def mapping(self, node: yaml.Node, where: str, allowed: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{where} must be a mapping of keys to values")
        found: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                raise self.fail(key_node, f"{where} has a key that is not a plain name")
            if key in found:
                raise self.fail(key_node, f"key '{key}' appears twice in {where}")
            if key not in allowed:
                raise self.fail(
                    key_node,
                    f"unknown key '{key}' in {where}; this connector version supports: "
                    f"{', '.join(allowed)}",
                )
            found[key] = (key_node, value_node)
        return found

    def scalar(self, node: yaml.Node, where: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{where} must be a single value")
        if node.style is not None:
            return node.value  # quoted or a block: always text
        try:
            return _plain_scalar(node.value)
        except ValueError as exc:
            raise self.fail(node, f"{where}: {exc}") from None

    def text(self, node: yaml.Node, where: str, pattern: re.Pattern[str] | None = None) -> str:
        value = self.scalar(node, where)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(node, f"{where} must be non-empty text")
        if pattern is not None and not pattern.fullmatch(value):
            raise self.fail(
                node, f"{where} {value!r} is not allowed here ({pattern_rule(pattern)})"
            )
        return value

    def text_list(self, node: yaml.Node, where: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.fail(node, f"{where} must be a non-empty list, like [a, b]")
        values = [self.text(item, f"an entry of {where}", pattern) for item in node.value]
        if len(set(values)) != len(values):
            raise self.fail(node, f"{where} lists an entry twice")
        return tuple(values)

    def moment(self, node: yaml.Node, where: str) -> dt.datetime:
        value = self.scalar(node, where)
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                # RFC 3339: a time without a zone would silently be read as UTC.
                raise self.fail(node, f"{where} needs a time zone, like 2026-01-31T08:00:00Z")
            try:
                return value.astimezone(dt.UTC)
            except OverflowError:
                raise self.fail(
                    node, f"{where} is out of range; write a year from 1 to 9999"
                ) from None
        if isinstance(value, dt.date):
            return dt.datetime(value.year, value.month, value.day, tzinfo=dt.UTC)
        raise self.fail(node, f"{where} must be a date (2026-01-31) or a date-time with zone")


def pattern_rule(pattern: re.Pattern[str]) -> str:
    """The rule a pattern stands for, in words a policy author can follow."""
    return {
        POLICY_ID.pattern: "lower-case letters, digits, '.', '_' and '-'",
        COLUMN_NAME.pattern: "a plain SQL name: letters, digits and _",
        DATASET_NAME.pattern: "a dataset name: a letter, then letters, digits and _",
        MEMBER_ID.pattern: "a member id: lower-case letters, digits, '.', '_' and '-'",
        PURPOSE.pattern: "letters, digits, spaces and . _ : / -",
        ANY_TEXT.pattern: "text of at most 2000 characters, no control characters",
    }.get(pattern.pattern, pattern.pattern)


def check_events(path: Path, document: str) -> None:
    """Bound the nesting and refuse tags, anchors and aliases, before anything is composed.

    PyYAML's parser keeps an explicit stack (it does not recurse); its composer and
    constructor recurse once per level. An explicit tag (!!int 0x, !!python/...) would
    bypass the strict scalar rules; an alias would let one edit change two places.
    """
    depth = 0
    for event in yaml.parse(document, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1 if event.start_mark is not None else None
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise PolicyError(
                "anchors and aliases (&name, *name) are not allowed in a policy; "
                "write each value out where it is used",
                path=str(path),
                line=line,
            )
        tag = getattr(event, "tag", None)
        if tag is not None:
            raise PolicyError(
                f"YAML tags ({tag}) are not allowed in a policy; remove the tag and write "
                "the value plainly, or quote it if it is text",
                path=str(path),
                line=line,
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise PolicyError(
                    f"nested more than {MAX_YAML_DEPTH} levels deep; a policy needs at most 4",
                    path=str(path),
                    line=line,
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def compose_strict(path: Path, data: bytes) -> yaml.Node | None:
    """The YAML node tree of data after the strict checks (None for an empty document);
    PolicyError names the file, the line and the problem."""
    try:
        document = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("not UTF-8 text", path=str(path)) from None
    try:
        check_events(path, document)
        node: yaml.Node | None = yaml.compose(document, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PolicyError(f"not valid YAML: {problem}", path=str(path), line=line) from None
    return node


def _plain_scalar(text: str) -> Any:
    """The value of a plain scalar under strict rules; ValueError says what to write instead."""
    if not text or _NULL.fullmatch(text):
        return None
    if _TRUE.fullmatch(text):
        return True
    if _FALSE.fullmatch(text):
        return False
    if _INT.fullmatch(text):
        if len(text) > 20 or abs(int(text)) > MAX_WHOLE_NUMBER:
            raise ValueError(f"the number {text[:30]} is too large")
        return int(text)
    refusal = _ambiguous(text)
    if refusal:
        raise ValueError(refusal)
    if _FLOAT.fullmatch(text):
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"the number {text[:30]} is too large")
        return value
    if _DATE_LIKE.fullmatch(text):
        return _timestamp(text)
    return text


def _ambiguous(text: str) -> str | None:
    """Why a plain scalar is refused: YAML 1.1 would read it as something else than it shows."""
    quoted = f"quote it as '{text}' if you mean text"
    if _YAML11_BOOL.fullmatch(text):
        return (
            f"{text} is ambiguous (older YAML reads it as true or false); "
            f"write true or false, or {quoted}"
        )
    if _SPECIAL_FLOAT.fullmatch(text):
        return f"{text} is not a finite number; write a number, or {quoted}"
    if _LEADING_ZERO.fullmatch(text):
        number = text.lstrip("+-").lstrip("0").replace("_", "") or "0"
        return (
            f"{text} has a leading zero (older YAML reads it as octal); write {number}, or {quoted}"
        )
    if _BASED_INT.fullmatch(text):
        return f"{text} is not a decimal number; write the number in decimal digits, or {quoted}"
    if _SEXAGESIMAL.fullmatch(text):
        return f"{text} would be read as a base-60 number; write the number itself, or {quoted}"
    if _UNDERSCORED.fullmatch(text):
        return f"{text} has '_' in a number; write the digits without '_', or {quoted}"
    return None


def _timestamp(text: str) -> dt.date | dt.datetime:
    """A date (2026-01-31) or date-time (2026-01-31T08:00:00Z) that exists in the calendar."""
    date, moment = _DATE.fullmatch(text), _DATETIME.fullmatch(text)
    try:
        if date:
            return dt.date(*(int(part) for part in date.groups()))
        if moment:
            year, month, day, hour, minute, second = (int(p) for p in moment.groups()[:6])
            fraction, zone = moment.group(7), moment.group(8)
            micro = int((fraction[1:] + "000000")[:6]) if fraction else 0
            tz = _zone(zone) if zone else None
            return dt.datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        raise ValueError(
            f"{text} is not a date in the calendar; write a real date like 2026-01-31, "
            f"or quote it as '{text}' if you mean text"
        ) from None
    raise ValueError(
        f"{text} looks like a date but is not written as 2026-01-31 or 2026-01-31T08:00:00Z; "
        f"write it so, or quote it as '{text}' if you mean text"
    )


def _zone(zone: str) -> dt.tzinfo:
    if zone in ("Z", "z"):
        return dt.UTC
    sign = -1 if zone[0] == "-" else 1
    hours, minutes = int(zone[1:3]), int(zone[4:6])
    if hours > 23 or minutes > 59:
        raise ValueError(zone)
    return dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes))
