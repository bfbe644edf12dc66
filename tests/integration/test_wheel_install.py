"""A normal install serves: the wheel carries everything the server needs.

The wheel is built from this tree and installed into a new virtual environment whose only
other packages are the dependencies (taken from the test's own environment, so the test
needs no network); every command then runs from the wheel, not from the source tree.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from pyarrow import flight

from tests.conftest import ServerProcess, policy_text, write_defects_csv
from tests.integration.test_flight_sql import flight_query

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

# The set-up commands in one child process of the installed wheel (each a process of its
# own cost about 0.5 s of starting Python and importing): it says which connector package it
# runs, then each command's exit status and output, and stops at the first failure.
RUN_COMMANDS = """\
import contextlib, io, json, sys
import connector
from connector.cli.main import main
print(json.dumps({"connector": connector.__file__}), flush=True)
for words in json.loads(sys.argv[1]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(words)
    print(json.dumps({"words": words, "status": status, "out": out.getvalue()}), flush=True)
    if status != 0:
        sys.exit(1)
"""


def _build_wheel(wheels: Path) -> Path:
    """The wheel, made by the build backend pyproject.toml names through its PEP 517 hook,
    as `pip wheel --no-build-isolation` does (without pip's own start-up)."""
    backend = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["build-backend"]
    build = f"import {backend} as backend, sys; print(backend.build_wheel(sys.argv[1]))"
    subprocess.run(
        [sys.executable, "-c", build, str(wheels)],
        cwd=REPO, check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("connector-*.whl")
    return wheel


def _run(python: Path, *args: str | Path) -> str:
    done = subprocess.run(
        [str(python), "-m", "connector.cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def _run_in_one_process(python: Path, target: Path, *commands: list[str | Path]) -> list[str]:
    """Each command's output, all run by one child process that imports connector from target."""
    done = subprocess.run(
        [str(python), "-c", RUN_COMMANDS, json.dumps([[str(w) for w in c] for c in commands])],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    # Only its own lines: the commands' output went into them (a library writing to the
    # process's stdout directly would add lines of its own).
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith('{"')]
    assert lines and lines[0]["connector"].startswith(str(target)), done.stdout + done.stderr
    ran = lines[1:]
    assert done.returncode == 0 and len(ran) == len(commands), done.stdout + done.stderr
    assert [line["status"] for line in ran] == [0] * len(commands)
    return [str(line["out"]) for line in ran]


def test_a_wheel_installed_in_a_new_environment_inits_ingests_signs_serves_and_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PYTHONPATH pointing at a source tree (as when testing a worktree) would shadow the
    # installed wheel in every child process; so would the working folder, which `python -m`
    # and `python -c` put first on the path (the suite runs from the source tree).
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    # pip compiles what it installs; here the first child process does, once, for the rest.
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    wheel = _build_wheel(tmp_path / "wheels")
    names = zipfile.ZipFile(wheel).namelist()
    assert "connector/policy/authz.rego" in names
    assert any(n.endswith("entry_points.txt") for n in names)

    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    target = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    zipfile.ZipFile(wheel).extractall(target)
    # The dependencies come from this test's environment; its editable install of the
    # connector does not (a path in a .pth file does not run that directory's .pth files).
    (target / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")

    space, owner, peer = tmp_path / "space", tmp_path / "owner", tmp_path / "peer"
    policy = owner / "policies" / "p.yaml"
    policy.parent.mkdir(parents=True)  # init takes a folder that has no connector.toml yet
    policy.write_text(policy_text("p", members="[peer]"))
    *_, verify = _run_in_one_process(
        python,
        target,
        ["dataspace", "init", space, "--name", "wheel-space"],
        ["init", owner, "--member", "owner", "--dataspace", space],
        ["init", peer, "--member", "peer", "--dataspace", space],
        ["ingest", "--home", owner, write_defects_csv(tmp_path / "d.csv"),
         "--dataset", "part_defects"],
        ["policy", "sign", "--home", owner, policy],
        ["policy", "verify", "--home", owner],
    )  # fmt: skip
    assert "valid" in verify
    server = ServerProcess(owner, python=str(python), flight_listen="127.0.0.1:0")
    try:
        out = _run(
            python, "query", "--home", peer, "--to", f"127.0.0.1:{server.port}",
            "--purpose", "quality-benchmarking", "--format", "csv",
            "SELECT plant, count(*) AS n FROM part_defects GROUP BY plant ORDER BY plant",
        )  # fmt: skip
        # The Flight SQL port of the installed wheel (its generated messages are packaged).
        client = flight.FlightClient(
            f"grpc+tls://localhost:{server.flight_port}",
            tls_root_certs=(peer / "tls" / "ca.pem").read_bytes(),
            cert_chain=(peer / "tls" / "cert.pem").read_bytes(),
            private_key=(peer / "tls" / "key.pem").read_bytes(),
        )
        answer = flight_query(client, "SELECT plant FROM part_defects")
    finally:
        server.close()
    assert '"Dingolfing",50' in out
    assert answer.table.num_rows == 200
