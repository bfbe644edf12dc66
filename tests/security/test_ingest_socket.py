"""The live-ingest socket: only the server's own OS user can hand it a file.

Two layers, each tested alone against a real server: the socket's folder (0700) and file
(0600) keep other users out, and with both opened up the server still refuses a process of
another user by its peer credentials (SO_PEERCRED), loading nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from connector.config import load_settings
from connector.ingest_client import socket_path
from connector.server import RunningServer
from tests.conftest import Member, connect, write_defects_csv

NOBODY = 65534
# Another user cannot run the project's interpreter (under root's home): any system one will
# do, the child uses the standard library only.
PYTHON = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin")
pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or PYTHON is None, reason="needs root (to act as another user) and python3"
)

# Run as another user: connect through the folder's descriptor (so no folder above it needs
# to be open to that user), send an ingest request, print what happened.
CHILD = """
import json, socket, sys
folder, source = sys.argv[1], sys.argv[2]
request = {"op": "ingest", "source": source, "dataset": "part_defects", "mode": "append"}
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as channel:
    try:
        channel.connect(f"/proc/self/fd/{folder}/ingest.sock")
    except OSError as error:
        print(json.dumps({"connect": type(error).__name__}))
        sys.exit(0)
    try:
        channel.sendall(json.dumps(request).encode())
        channel.shutdown(socket.SHUT_WR)
    except BrokenPipeError:
        pass  # the server answered and closed before reading anything
    print(channel.makefile().read())
"""


@pytest.fixture(scope="module")
def running(
    module_member: Callable[[str], Member], module_serve: Callable[[Member], RunningServer]
) -> tuple[Member, Member, RunningServer]:
    owner, peer = module_member("carmaker"), module_member("supplier-a")
    owner.ingest(write_defects_csv(owner.home / "d.csv", 20), "part_defects")
    return owner, peer, module_serve(owner)


def _as_nobody(path: Path, source: Path) -> dict[str, object]:
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        done = subprocess.run(
            [str(PYTHON), "-I", "-c", CHILD, str(folder), str(source)],
            user=NOBODY,
            group=NOBODY,
            pass_fds=(folder,),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(folder)
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def _rows(server: RunningServer) -> int:
    return server.provider.sandbox.datasets()["part_defects"].rows


def test_another_user_cannot_reach_the_socket(
    running: tuple[Member, Member, RunningServer], tmp_path: Path
) -> None:
    owner, _, server = running
    path = socket_path(load_settings(owner.home))
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600
    source = write_defects_csv(tmp_path / "more.csv", 5)
    assert _as_nobody(path, source) == {"connect": "PermissionError"}
    assert _rows(server) == 20


def test_another_user_is_refused_by_its_credentials_even_with_the_socket_open(
    running: tuple[Member, Member, RunningServer], tmp_path: Path
) -> None:
    owner, grantee, server = running
    path = socket_path(load_settings(owner.home))
    source = write_defects_csv(tmp_path / "more.csv", 5)
    os.chmod(tmp_path, 0o755)
    os.chmod(source, 0o644)
    os.chmod(path.parent, 0o755)
    os.chmod(path, 0o666)
    try:
        answer = _as_nobody(path, source)
    finally:
        os.chmod(path.parent, 0o700)
        os.chmod(path, 0o600)
    assert answer["ok"] is False
    assert "own OS user" in str(answer["message"])
    assert _rows(server) == 20
    with connect(server, grantee) as peer:
        peer.catalog()  # the server keeps serving
