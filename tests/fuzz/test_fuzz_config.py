"""Fuzz connector.toml: a mutated file is read into finite settings or is a ConfigError."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from hypothesis import given

from connector.config import load_settings
from connector.config_template import render_config
from connector.errors import ConfigError
from tests.fuzz.mutation import mutated

SEED = render_config("acme", "space", "127.0.0.1:7000")
TOML_PIECES = [
    "nan",
    "+nan",
    "-inf",
    "inf",
    "1e999",
    "9" * 400,
    "-1",
    "0.0",
    "1979-05-27",
    "true",
    '"x"',
    "'x'",
    '"""\nx"""',
    "[1, [2]]",
    "{a = 1}",
    "[" * 3000 + "]" * 3000,
    "{a = " * 100 + "1" + "}" * 100,
    "a.b.c = 1",
    "[server]",
    "[[x]]",
    "= =",
    "#",
]
HOME = Path(tempfile.mkdtemp(prefix="fuzz-config-"))


@given(mutated(SEED, TOML_PIECES))
def test_a_mutated_config_is_read_or_refused_with_a_config_error(text: str) -> None:
    (HOME / "connector.toml").write_bytes(text.encode("utf-8", errors="surrogatepass"))
    try:
        settings = load_settings(HOME)
    except ConfigError:
        return
    assert math.isfinite(settings.server.max_query_seconds)
    assert math.isfinite(settings.policies.reload_seconds)
