"""The server process's memory bound: sizes, the setting, and where the limit is set."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from connector.config import load_settings
from connector.config_template import render_config
from connector.errors import ConfigError
from connector.process_memory import (
    DEFAULT_OVERHEAD,
    mapped_bytes,
    parse_size,
    process_allowance,
)
from tests.conftest import Space


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GB", 10**9), ("512MiB", 512 << 20), ("2 gib", 2 << 30), ("1.5GB", 1_500_000_000)],
)
def test_sizes_read_as_duckdb_writes_them(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "1G", "lots", "-1GB", "1e9B"])
def test_what_is_not_a_size_is_none(text: str) -> None:
    assert parse_size(text) is None


def test_auto_is_duckdbs_limit_plus_the_overhead() -> None:
    assert process_allowance("1GB", "auto") == 10**9 + DEFAULT_OVERHEAD
    assert process_allowance("1GB", "3GiB") == 3 << 30


def _config(tmp_path: Path, setting: str) -> Path:
    text = render_config("acme", "space", "127.0.0.1:7000").replace(
        'process_memory_limit = "auto"', f"process_memory_limit = {setting}"
    )
    (tmp_path / "connector.toml").write_text(text)
    return tmp_path


def test_the_generated_config_has_the_setting_and_explains_it(tmp_path: Path) -> None:
    text = render_config("acme", "space", "127.0.0.1:7000")
    assert 'process_memory_limit = "auto"' in text and "RESOURCE_EXHAUSTED" in text
    assert load_settings(_config(tmp_path, '"auto"')).server.process_memory_limit == "auto"
    assert load_settings(_config(tmp_path, '"3GiB"')).server.process_memory_limit == "3GiB"


@pytest.mark.parametrize(
    ("setting", "words"),
    [('"100MB"', "at least memory_limit"), ('"plenty"', "must be"), ("3", "wrong type")],
)
def test_a_bad_process_memory_limit_is_refused_with_the_rule(
    tmp_path: Path, setting: str, words: str
) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings(_config(tmp_path, setting))


def test_in_process_servers_leave_the_test_process_unlimited(space: Space) -> None:
    """Only `connector serve` limits its process; start_server (tests, embedding) does not."""
    assert space.server.port
    assert resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY
    assert (mapped_bytes() or 0) > 0
