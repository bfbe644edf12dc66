"""Canonical JSON: one text for one value, so hashes and signatures over JSON are stable.

Keys sorted, no spaces, non-ASCII escaped (the audit log's hash chain depends on exactly
this form: change it and old logs no longer verify).
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> str:
    """value as canonical JSON text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def canonical_bytes(value: Any) -> bytes:
    """value as canonical JSON, UTF-8 encoded (what gets hashed or signed)."""
    return canonical_json(value).encode("utf-8")


def json_copy(value: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, tuples of scalars), faster than
    copy.deepcopy: scalars, the most of it, are taken as they are without a call."""
    if isinstance(value, dict):
        return {k: v if type(v) in _SCALARS else json_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        copied = [v if type(v) in _SCALARS else json_copy(v) for v in value]
        return copied if isinstance(value, list) else tuple(copied)
    return value


_SCALARS = frozenset({str, int, float, bool, type(None)})
