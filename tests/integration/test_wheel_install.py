"""A normal install serves: the wheel carries everything the server needs.

The wheel is built from this tree and installed into a new virtual environment whose only
other packages are the dependencies (taken from the test's own environment, so the test
needs no network); every command then runs from the wheel, not from the source tree.
"""

from __future__ import annotations

import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from pyarrow import flight

from tests.conftest import ServerProcess, policy_text, write_defects_csv
from tests.integration.test_flight_sql import flight_query

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


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


def test_a_wheel_installed_in_a_new_environment_inits_ingests_signs_serves_and_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PYTHONPATH pointing at a source tree (as when testing a worktree) would shadow the
    # installed wheel in every child process.
    monkeypatch.delenv("PYTHONPATH", raising=False)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheels), str(REPO)],
        check=True,
        timeout=300,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = wheels.glob("connector-*.whl")
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
    where = subprocess.run(
        [str(python), "-c", "import connector; print(connector.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert where.startswith(str(target)), where

    space, owner, peer = tmp_path / "space", tmp_path / "owner", tmp_path / "peer"
    _run(python, "dataspace", "init", space, "--name", "wheel-space")
    _run(python, "init", owner, "--member", "owner", "--dataspace", space)
    _run(python, "init", peer, "--member", "peer", "--dataspace", space)
    _run(python, "ingest", "--home", owner, write_defects_csv(tmp_path / "d.csv"),
         "--dataset", "part_defects")  # fmt: skip
    policy = owner / "policies" / "p.yaml"
    policy.write_text(policy_text("p", members="[peer]"))
    _run(python, "policy", "sign", "--home", owner, policy)
    assert "valid" in _run(python, "policy", "verify", "--home", owner)
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
