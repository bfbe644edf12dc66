"""Strict reading of TOML tables: typed values, unknown keys refused, nesting bounded."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from connector.errors import ConfigError

# connector.toml is two levels deep; tomllib recurses once per level of arrays and inline
# tables, so thousands of levels raised RecursionError. Bounded before parsing.
MAX_TOML_DEPTH = 16
MAX_WHOLE = 2**31 - 1  # gRPC and DuckDB take these settings as 32-bit integers
# Strings and comments, whose brackets do not nest: multi-line forms first.
TOML_SKIP = re.compile(
    "|".join(
        (r'"""[\s\S]*?"""', r"'''[\s\S]*?'''", r'"(?:[^"\\\n]|\\.)*"', r"'[^'\n]*'", r"#[^\n]*")
    )
)
TOML_BRACKET = re.compile(r"[\[\]{}]")
REQUIRED = object()  # a key that must be present


def check_nesting(path: Path, text: str) -> None:
    """ConfigError when arrays or inline tables nest deeper than MAX_TOML_DEPTH."""
    depth = 0
    for bracket in TOML_BRACKET.finditer(TOML_SKIP.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > MAX_TOML_DEPTH:
            line = text.count("\n", 0, bracket.start()) + 1
            raise ConfigError(
                f"{path}:{line}: nested more than {MAX_TOML_DEPTH} levels deep; "
                "write it as `connector init` does"
            )
        depth = max(depth, 0)


class TomlSection:
    """One TOML table being read; remembers which keys were used to reject the rest."""

    def __init__(self, raw: Any, name: str, path: Path) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.raw: dict[str, Any] = raw
        self.name = name
        self.path = path
        self.used: set[str] = set()

    def value(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        """The key's value if it has the kind (default when absent; REQUIRED: it must be there)."""
        self.used.add(key)
        if key not in self.raw:
            if default is REQUIRED:
                raise ConfigError(f"{self.path}: [{self.name}] needs '{key}'")
            return default
        value = self.raw[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(f"{self.path}: [{self.name}] {key} must not be true/false")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.path}: [{self.name}] {key} has the wrong type ({value!r})")
        return value

    def text(self, key: str, default: Any = None) -> str:
        return str(self.value(key, str, REQUIRED if default is None else default))

    def number(self, key: str, default: float, minimum: float, maximum: float) -> float:
        raw = self.value(key, (int, float), default)
        try:
            value = float(raw)
        except OverflowError:  # an integer of hundreds of digits
            value = math.inf
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise ConfigError(
                f"{self.path}: [{self.name}] {key} must be a number from {minimum:g} to "
                f"{maximum:g}, not {str(raw)[:40]}"
            )
        return value

    def whole(self, key: str, default: int, minimum: int, maximum: int = MAX_WHOLE) -> int:
        value = int(self.value(key, int, default))
        if not minimum <= value <= maximum:
            raise ConfigError(
                f"{self.path}: [{self.name}] {key} must be a whole number from {minimum} to "
                f"{maximum}, not {str(value)[:40]}"
            )
        return value

    def strings(self, key: str) -> list[str]:
        values = self.value(key, list, [])
        if not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{self.path}: [{self.name}] {key} must be a list of strings")
        return list(values)

    def table(self, key: str) -> dict[str, Any]:
        return dict(self.value(key, dict, {}))

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.path}: unknown key(s) in [{self.name}]: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(self.used))}"
            )
