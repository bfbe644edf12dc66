"""connector.toml: defaults, strictness and versioning."""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.config import DEFAULT_FLIGHT_LISTEN, DEFAULT_PATHS, ServerSettings, load_settings
from connector.config_template import render_config
from connector.errors import ConfigError


def _home(tmp_path: Path, text: str) -> Path:
    (tmp_path / "connector.toml").write_text(text)
    return tmp_path


def test_rendered_config_reads_back(tmp_path: Path) -> None:
    settings = load_settings(_home(tmp_path, render_config("acme", "space", "127.0.0.1:7000")))
    assert settings.member_id == "acme"
    assert settings.server.listen == "127.0.0.1:7000"
    assert settings.cert == tmp_path / "tls" / "cert.pem"
    assert settings.policies.trusted_signers == {"legal": tmp_path / "keys/policy-signing.key.pub"}
    assert settings.revoked.members == frozenset()


def test_missing_config_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="connector init"):
        load_settings(tmp_path)


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    text = render_config("acme", "space", "127.0.0.1:7000").replace(
        "threads = 2", "threads = 2\nthreds = 4"
    )
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[server\]: threds"):
        load_settings(_home(tmp_path, text))


def test_newer_format_asks_for_an_upgrade(tmp_path: Path) -> None:
    text = render_config("acme", "space", "x:1").replace("format = 1", "format = 2")
    with pytest.raises(ConfigError, match="newer connector"):
        load_settings(_home(tmp_path, text))


def test_revoked_serials_are_hex(tmp_path: Path) -> None:
    text = render_config("acme", "space", "x:1").replace(
        "serials = []", 'serials = ["0a:ff", "zz"]'
    )
    with pytest.raises(ConfigError, match="'zz'"):
        load_settings(_home(tmp_path, text))
    ok = render_config("acme", "space", "x:1").replace("serials = []", 'serials = ["0a:ff"]')
    assert load_settings(_home(tmp_path, ok)).revoked.serials == frozenset({0x0AFF})


def test_wrong_type_is_named(tmp_path: Path) -> None:
    text = render_config("acme", "space", "x:1").replace("threads = 2", 'threads = "two"')
    with pytest.raises(ConfigError, match="threads has the wrong type"):
        load_settings(_home(tmp_path, text))


RENDERED = render_config("acme", "space", "127.0.0.1:7000")


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ("reload_seconds = 2", "reload_seconds = nan", "reload_seconds must be a number"),
        ("reload_seconds = 2", "reload_seconds = inf", "reload_seconds must be a number"),
        ("reload_seconds = 2", "reload_seconds = -nan", "reload_seconds must be a number"),
        ("max_query_seconds = 30", "max_query_seconds = inf", "max_query_seconds must be"),
        ("max_query_seconds = 30", "max_query_seconds = +inf", "max_query_seconds must be"),
        ("max_query_seconds = 30", "max_query_seconds = 1e300", "max_query_seconds must be"),
        ("max_query_seconds = 30", "max_query_seconds = " + "9" * 400, "max_query_seconds"),
        ("reload_seconds = 2", "reload_seconds = " + "1" * 400, "reload_seconds must be"),
        ("threads = 2", "threads = " + "9" * 400, "threads must be a whole number"),
        ("max_message_bytes", "max_message_bytes = 4294967296\n#", "max_message_bytes must"),
        ("queue_length = 64", "queue_length = 1025", "queue_length must be a whole number"),
        ("queue_length = 64", "queue_length = -1", "queue_length must be a whole number"),
        ("queue_seconds = 5 ", "queue_seconds = inf ", "queue_seconds must be"),
        ("queue_seconds = 5 ", "queue_seconds = 601 ", "queue_seconds must be"),
    ],
)
def test_every_number_setting_is_finite_and_in_range(
    tmp_path: Path, old: str, new: str, words: str
) -> None:
    text = RENDERED.replace(old, new)
    if "max_message_bytes" in old:
        text = text.replace("[tls]", "max_message_bytes = 4294967296\n\n[tls]")
    assert text != RENDERED
    with pytest.raises(ConfigError, match=words):
        load_settings(_home(tmp_path, text))


@pytest.mark.parametrize(
    "nested",
    [
        "x = " + "[" * 5000 + "]" * 5000,
        "x = " + "{a = " * 5000 + "1" + "}" * 5000,
        "x = " + "[" * 20 + "]" * 20,
    ],
)
def test_deeply_nested_toml_is_an_error_not_a_recursion_error(tmp_path: Path, nested: str) -> None:
    text = RENDERED.replace("[revoked]", nested + "\n\n[revoked]")
    with pytest.raises(ConfigError, match="nested more than 16 levels deep"):
        load_settings(_home(tmp_path, text))


def test_brackets_in_toml_strings_and_comments_do_not_count(tmp_path: Path) -> None:
    text = RENDERED.replace(
        'dataspace = "space"',
        'dataspace = "' + "[" * 40 + '"  # ' + "{" * 40 + "\n# " + "[" * 40,
    )
    assert load_settings(_home(tmp_path, text)).dataspace == "[" * 40


@pytest.mark.parametrize(
    ("written", "size"),
    [('"1GiB"', 1024**3), ('"512MB"', 512 * 1000**2), ("2097152", 2 * 1024**2)],
)
def test_shaped_copies_max_bytes_reads_sizes(tmp_path: Path, written: str, size: int) -> None:
    text = render_config("acme", "space", "127.0.0.1:0").replace(
        'shaped_copies_max_bytes = "1GiB"', f"shaped_copies_max_bytes = {written}"
    )
    assert load_settings(_home(tmp_path, text)).shaped_copies_max_bytes == size


@pytest.mark.parametrize(
    ("written", "message"),
    [('"lots"', "not a size"), ("1000", "at least 1MiB"), ('"3 parsecs"', "not a size")],
)
def test_shaped_copies_max_bytes_refuses_what_is_not_a_size(
    tmp_path: Path, written: str, message: str
) -> None:
    text = render_config("acme", "space", "127.0.0.1:0").replace(
        'shaped_copies_max_bytes = "1GiB"', f"shaped_copies_max_bytes = {written}"
    )
    with pytest.raises(ConfigError, match=message):
        load_settings(_home(tmp_path, text))


def test_the_per_member_share_defaults_to_half_the_slots(tmp_path: Path) -> None:
    text = render_config("acme", "space", "127.0.0.1:0").replace(
        "max_concurrent_queries = 8", "max_concurrent_queries = 6"
    )
    server = load_settings(_home(tmp_path, text)).server
    assert (server.max_concurrent_queries_per_member, server.stall_seconds) == (3, 30.0)


def test_the_slot_queue_reads_back(tmp_path: Path) -> None:
    text = RENDERED.replace("queue_length = 64", "queue_length = 0").replace(
        "queue_seconds = 5 ", "queue_seconds = 0.25 "
    )
    server = load_settings(_home(tmp_path, text)).server
    assert (server.queue_length, server.queue_seconds) == (0, 0.25)


def test_the_file_init_writes_says_exactly_the_defaults(tmp_path: Path) -> None:
    # One source for each default and path: a connector.toml that leaves every setting out
    # reads the same as the one `connector init` writes with each setting spelled out.
    written = render_config("acme", "space", ServerSettings.listen)
    minimal = '[member]\nid = "acme"\ndataspace = "space"\n\n[policies.trusted_signers]\n'
    minimal += f'legal = "{DEFAULT_PATHS["signing", "policy_key"]}.pub"\n'
    # ... except [flight]: a home from before the Flight SQL port has none, so its absence
    # means off, while `init` writes the port (on in new homes).
    minimal += f'\n[flight]\nlisten = "{DEFAULT_FLIGHT_LISTEN}"\n'
    full = load_settings(_home(tmp_path, written))
    assert load_settings(_home(tmp_path, minimal)) == full
    for (section, key), default in DEFAULT_PATHS.items():
        assert f'{key} = "{default}"' in written, (section, key)


def test_an_old_home_without_flight_keeps_the_flight_port_off(tmp_path: Path) -> None:
    text = render_config("acme", "space", "127.0.0.1:7000")
    old = text[: text.index("[flight]")]
    assert load_settings(_home(tmp_path, old)).flight.listen == ""
    assert load_settings(_home(tmp_path, text)).flight.listen == DEFAULT_FLIGHT_LISTEN


@pytest.mark.parametrize("listen", ["50052", "host:", ":50052", "a b:1", "h:99999", "h:1;x"])
def test_a_bad_flight_listen_is_refused_with_the_form(tmp_path: Path, listen: str) -> None:
    text = render_config("acme", "space", "127.0.0.1:7000", listen)
    with pytest.raises(ConfigError, match=r'\[flight\] listen must be "HOST:PORT"'):
        load_settings(_home(tmp_path, text))
