"""Fuzz connector.toml: a mutated file is read into finite settings or is a ConfigError."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every example: a module-scoped fixture, as hypothesis asks."""
    return tmp_path_factory.mktemp("fuzz-config")


@given(text=mutated(SEED, TOML_PIECES))
def test_a_mutated_config_is_read_or_refused_with_a_config_error(home: Path, text: str) -> None:
    (home / "connector.toml").write_bytes(text.encode("utf-8", errors="surrogatepass"))
    try:
        settings = load_settings(home)
    except ConfigError:
        return
    assert math.isfinite(settings.server.max_query_seconds)
    assert math.isfinite(settings.policies.reload_seconds)
