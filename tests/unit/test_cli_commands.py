"""The command table: each command loads only its own module, and none is lost by that."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from connector.cli.main import COMMAND_MODULES, build_parser, main, named_command


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_table_names_every_command_its_modules_register_and_nothing_else() -> None:
    assert list(_commands(build_parser())) == list(COMMAND_MODULES)
    for command, module in COMMAND_MODULES.items():
        alone = _commands(build_parser(command))
        assert command in alone
        assert {COMMAND_MODULES[c] for c in alone} == {module}


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["query", "--to", "x"], "query"),
        (["-v", "policy", "sign"], "policy"),
        (["--log-format", "json", "--log-level=debug", "serve", "--home", "h"], "serve"),
        (["--log-format", "xml", "serve"], None),
        (["--help"], None),
        ([], None),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_the_command_is_the_first_word_that_is_not_an_option(
    argv: list[str], command: str | None
) -> None:
    assert named_command(argv) == command


def test_an_unknown_command_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["no-such-command"])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert all(command in error for command in COMMAND_MODULES)


def test_a_peer_command_does_not_load_the_server_duckdb_or_opendp() -> None:
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from connector.cli.main import build_parser; build_parser('query');"
            "print(' '.join(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for heavy in ("duckdb", "opendp", "connector.server", "connector.provider", "regopy"):
        assert heavy not in loaded, heavy
