"""`connector serve` as a real process, as an IT team runs it: SIGHUP takes a new
certificate without a restart, SIGTERM during queries stops cleanly, logs in JSON."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from connector.arrow_stream import read_ipc_pieces
from connector.audit_chain import read_entries
from connector.client import Peer
from connector.errors import ConnectorError, Unavailable
from tests.conftest import Member, ProviderPair, ServerProcess, run_cli, wait_for
from tests.integration.test_tls_rotation import served_certificate

# Each test starts `connector serve` as a new Python process (about 2 s alone).
pytestmark = pytest.mark.slow

PURPOSE = "quality-benchmarking"
SLOW = (
    "SELECT count(*) FROM part_defects a, part_defects b, part_defects c, part_defects d "
    "WHERE a.plant || b.plant || c.plant || d.plant = 'x'"
)
LARGE = "SELECT a.plant, b.week FROM part_defects a CROSS JOIN part_defects b"  # 40,000 rows
GRACE = 3


@pytest.fixture
def server_process() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(member: Member, *extra: str) -> ServerProcess:
        server = ServerProcess(member.home, extra=extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def _handshake_without_certificate(port: int) -> None:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        contextlib.suppress(OSError),
        context.wrap_socket(raw) as tls,
    ):
        tls.recv(1)  # the server ends the handshake: no client certificate


def _json_lines(server: ServerProcess) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in server.lines if line.strip()]
    assert all(isinstance(line, dict) and line["message"] for line in lines)
    return lines


def test_sighup_serves_a_new_certificate_without_a_restart(
    tmp_path: Path,
    dataspace: Path,
    provider_pair: ProviderPair,
    server_process: Callable[..., ServerProcess],
) -> None:
    provider, grantee = provider_pair()
    server = server_process(provider, "--log-format", "json", "--log-level", "info")
    before = served_certificate(server.port, grantee)
    assert run_cli("dataspace", "issue", dataspace, "carmaker", "--out", tmp_path / "new") == 0
    new = x509.load_pem_x509_certificate((tmp_path / "new" / "cert.pem").read_bytes())
    # Same size and mtime resolution aside, only SIGHUP is relied on here: the polling
    # watcher runs every reload_seconds, the signal at once.
    for name in ("key.pem", "cert.pem"):
        shutil.copyfile(tmp_path / "new" / name, provider.home / "tls" / name)
    os.kill(server.process.pid, signal.SIGHUP)
    wait_for(lambda: served_certificate(server.port, grantee).serial_number != before.serial_number)
    assert served_certificate(server.port, grantee).serial_number == new.serial_number
    assert server.process.poll() is None  # the same process: no restart
    with Peer(f"127.0.0.1:{server.port}", grantee.identity()) as peer:
        assert peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE).num_rows == 1
    _handshake_without_certificate(server.port)  # gRPC's own line for it must not break JSON
    server.process.send_signal(signal.SIGTERM)
    assert server.exit_code() == 0
    lines = _json_lines(server)
    assert any("TLS files reloaded" in str(line["message"]) for line in lines)
    answered = [line for line in lines if str(line["message"]).startswith("answered ")]
    assert answered and answered[0]["member"] == "supplier-a"
    assert str(answered[0]["request_id"]) in str(answered[0]["message"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _active_queries(metrics_port: int) -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode("utf-8")
    line = next(line for line in text.splitlines() if line.startswith("connector_active_queries"))
    return float(line.split()[-1])


def test_sigterm_lets_running_queries_finish_then_stops_the_rest_and_exits_0(
    provider_pair: ProviderPair, server_process: Callable[..., ServerProcess]
) -> None:
    metrics_port = _free_port()
    provider, grantee = provider_pair(
        settings={
            "shutdown_grace_seconds = 10": f"shutdown_grace_seconds = {GRACE}",
            # Many small pieces: gRPC's flow control holds the answer while the peer waits.
            "batch_rows = 65536": "batch_rows = 200",
            '# listen = "127.0.0.1:9464"': f'listen = "127.0.0.1:{metrics_port}"',
        }
    )
    server = server_process(provider, "--log-format", "json")
    audit = provider.home / "audit" / "audit.jsonl"
    address = f"127.0.0.1:{server.port}"
    outcome: dict[str, BaseException] = {}

    def slow_query() -> None:
        try:
            with Peer(address, grantee.identity(), timeout=120) as peer:
                peer.query(SLOW, PURPOSE)
        except ConnectorError as error:
            outcome["slow"] = error

    slow = threading.Thread(target=slow_query)
    slow.start()
    with Peer(address, grantee.identity(), timeout=120) as reader:
        stream = reader.stream(LARGE, PURPOSE)
        pieces = [next(stream).arrow_ipc]  # the large answer is being sent
        wait_for(lambda: sum(e["type"] == "opened" for e in read_entries(audit)) == 1)
        wait_for(lambda: _active_queries(metrics_port) == 2)  # and the slow one runs
        stopping = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        wait_for(lambda: "SIGTERM received" in server.log())
        with Peer(address, grantee.identity()) as late, pytest.raises(ConnectorError):
            late.catalog()  # no new request is taken
        time.sleep(1)  # the peer reads slowly: the answer is still being sent
        receipt = None
        for message in stream:
            if message.HasField("receipt"):
                receipt = message.receipt
            else:
                pieces.append(message.arrow_ipc)
    assert receipt is not None and receipt.jws
    assert read_ipc_pieces(pieces).num_rows == 40_000
    slow.join(timeout=60)
    assert isinstance(outcome.get("slow"), Unavailable)
    assert "shutting down" in str(outcome["slow"])
    assert server.exit_code(60) == 0
    assert time.monotonic() - stopping < GRACE + 10
    log = server.log()
    assert "Traceback" not in log
    messages = [str(line["message"]) for line in _json_lines(server)]
    signalled = next(i for i, m in enumerate(messages) if m.startswith("SIGTERM received"))
    finished = next(i for i, m in enumerate(messages) if m.startswith("answered "))
    assert finished > signalled  # the large answer was still being sent at SIGTERM
    entries = list(read_entries(audit))
    outcomes = sorted(str(e["outcome"]) for e in entries if e["type"] == "request")
    assert outcomes == ["answered", "shutdown"]
    assert entries[-1]["type"] == "checkpoint"
    assert run_cli("audit", "verify", "--home", provider.home) == 0
