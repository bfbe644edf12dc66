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
