"""The control path of `make bench`: server CPU per big call, tiny queries, cached decisions,
and many concurrent peers, against a connector served by its own process.

  server CPU        CPU seconds `connector serve` spends on one big answer, against a bare
                    grpcio server (bench/bare_grpc.py) streaming the very same bytes over the
                    same mutual TLS;
  tiny query        p50 and p99 of one-row queries through the raw gRPC stub;
  cached decision   one decision taken again in-process (the policy engine's answer for the
                    same member, purpose, datasets and columns under the same policies);
  concurrent peers  N peers (own channels) sending tiny queries for a bounded time: answers,
                    errors by status code, and the server's memory before and after.

Tiny queries and concurrent peers are also measured on the connector's Arrow Flight SQL
port, through pyarrow's FlightClient (GetFlightInfo and DoGet: two calls a query; each peer
its own client), and tiny queries through ADBC's DB-API.

Run alone (`python -m bench.control`), it builds a small data space of its own first.
"""

from __future__ import annotations

# First: the package sets up the native allocators before duckdb and pyarrow load (see
# connector/__init__.py).
import connector  # noqa: F401

# isort: split

import argparse
import contextlib
import datetime as dt
import logging
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from bench.flight_clients import adbc_fetch, flight_client_fetch
from bench.floors import duckdb_query, fsync_append, write_messages
from bench.peer_load import (
    LoadResult,
    concurrent_load,
    flight_peer,
    grpc_peer,
    load_lines,
    percentile,
    raw_stub,
)
from connector.client import Peer, PeerIdentity
from connector.identity import MemberIdentity
from connector.request import PeerRequest

BARE_SERVER = Path(__file__).with_name("bare_grpc.py")
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    """A loopback port free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process pid so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def thread_count(pid: int) -> int:
    """Threads of process pid now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def rss_mib(pid: int) -> float:
    """Resident memory of process pid."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def _wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: Path, seconds: float = 60
) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise SystemExit(f"the server process ended at start ({process.returncode}):\n{tail}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"no server on port {port} after {seconds} s")


@contextmanager
def served(argv: list[str], port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A server process listening on port, its output in log; stopped (SIGTERM, then
    SIGKILL) afterwards."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, process, log)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def connector_process(home: Path, port: int, flight_port: int) -> list[str]:
    """The argv of `connector serve` for home on loopback ports (gRPC, Flight SQL)."""
    code = "import sys; from connector.cli.main import main; sys.exit(main())"
    listen, flight_listen = f"127.0.0.1:{port}", f"127.0.0.1:{flight_port}"
    return [sys.executable, "-c", code, "serve", "--home", str(home), "--listen", listen,
            "--flight-listen", flight_listen]  # fmt: skip


def bare_process(pieces: Path, tls: tuple[Path, Path, Path], port: int) -> list[str]:
    """The argv of the bare grpcio server streaming the pieces file."""
    cert, key, ca = tls
    return [sys.executable, str(BARE_SERVER), str(pieces), str(cert), str(key), str(ca), str(port)]


def write_pieces(peer: Peer, sql: str, purpose: str, path: Path) -> int:
    """Save the Arrow IPC pieces one connector answer carries (length-prefixed); their bytes."""
    total = 0
    with path.open("wb") as out:
        for message in peer.stream(sql, purpose):
            if not message.HasField("receipt"):
                out.write(len(message.arrow_ipc).to_bytes(8, "little"))
                out.write(message.arrow_ipc)
                total += len(message.arrow_ipc)
    return total


def server_cpu_per_call(pid: int, call: Callable[[], object], repeat: int) -> list[float]:
    """CPU seconds server pid spends on each of repeat calls."""
    spent = []
    for _ in range(repeat):
        before = cpu_seconds(pid)
        call()
        spent.append(cpu_seconds(pid) - before)
    return spent


def bare_stream(port: int, identity: PeerIdentity) -> Callable[[], int]:
    """One call to the bare server: the bytes it streamed."""
    channel = grpc.secure_channel(
        f"localhost:{port}",
        grpc.ssl_channel_credentials(identity.ca_pem, identity.key_pem, identity.cert_pem),
        options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
    )
    method = channel.unary_stream("/bench.Bare/Stream")

    def once() -> int:
        return sum(len(m) for m in method(b""))

    return once


def tiny_latencies(once: Callable[[], object], count: int) -> list[float]:
    """Seconds per call of once, a tiny query (after a few warm-up calls)."""
    for _ in range(5):
        once()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        once()
        times.append(time.perf_counter() - started)
    return times


def decision_seconds(home: Path, member: str, sql: str, purpose: str, count: int) -> list[float]:
    """Seconds per decision taken again for the same request, in-process (server not started)."""
    from connector.config import load_settings
    from connector.home_provider import build_provider

    provider = build_provider(load_settings(home))
    try:
        identity = MemberIdentity(provider.dataspace, member, member, 0)
        request = PeerRequest.checked(sql, purpose, 0, "")
        shape = provider.guard(sql)
        now = dt.datetime.now(dt.UTC)
        decide = provider.decide  # the cached path a repeated request takes
        decide(identity, request, shape, now)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            decide(identity, request, shape, now)
            times.append(time.perf_counter() - started)
        return times
    finally:
        provider.sandbox.close()
        provider.audit.close()
        provider.quotas.close()


def spread(values: list[float]) -> str:
    """Median and range, for a noisy shared machine."""
    return f"median {statistics.median(values):.4g} (min {min(values):.4g}, max {max(values):.4g})"


@dataclass(frozen=True)
class ControlSettings:
    """How long and how much the control-path part measures."""

    repeat: int = 3
    tiny: int = 300
    decisions: int = 2000
    load_seconds: float = 5.0
    peer_counts: tuple[int, ...] = (1, 16, 64)

    @classmethod
    def from_arguments(cls, args: argparse.Namespace) -> ControlSettings:
        """The settings bench_arguments' options give."""
        return cls(
            repeat=args.repeat,
            tiny=args.tiny,
            load_seconds=args.load_seconds,
            peer_counts=tuple(int(n) for n in args.peers.split(",")),
        )


def bench_arguments(parser: argparse.ArgumentParser, rows: int) -> argparse.ArgumentParser:
    """The options `make bench`'s scripts share (BENCH_ARGS), added to parser."""
    parser.add_argument("--rows", type=int, default=rows, help="rows of the big answer")
    parser.add_argument("--repeat", type=int, default=3, help="big calls timed")
    parser.add_argument("--tiny", type=int, default=300, help="tiny queries timed")
    parser.add_argument(
        "--load-seconds", type=float, default=5.0, help="how long each concurrent load runs"
    )
    parser.add_argument(
        "--peers", default="1,16,64", help="concurrent peer counts, comma-separated"
    )
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed")
    return parser


def measure_control(
    work: Path,
    provider: Path,
    identity: PeerIdentity,
    tls: tuple[Path, Path, Path],
    queries: tuple[str, str, str],
    options: ControlSettings,
) -> list[str]:
    """Run the control-path measurements against `connector serve` on provider's home;
    queries: the big one, a tiny one, and their purpose. Returns the report's lines."""
    big, tiny, purpose = queries
    lines = []
    port, flight_port = free_port(), free_port()
    address = f"localhost:{port}"
    argv = connector_process(provider, port, flight_port)
    with served(argv, port, work / "connector.log") as server:
        with (
            Peer(address, identity, timeout=600) as peer,
            adbc_fetch(flight_port, identity, tiny, purpose) as adbc_once,
        ):
            pieces, tiny_messages = work / "pieces.bin", work / "tiny-messages.bin"
            size = write_pieces(peer, big, purpose, pieces)
            message_count = write_messages(peer, tiny, purpose, tiny_messages)
            connector_cpu = server_cpu_per_call(
                server.pid, raw_stub(peer, big, purpose), options.repeat
            )
            tiny_times = {
                "raw gRPC stub": tiny_latencies(raw_stub(peer, tiny, purpose), options.tiny),
                "Flight SQL, FlightClient": tiny_latencies(
                    flight_client_fetch(flight_port, identity, tiny, purpose), options.tiny
                ),
                "Flight SQL, ADBC": tiny_latencies(adbc_once, options.tiny),
            }
        sessions = {
            "gRPC": grpc_peer(address, identity, tiny, purpose),
            "Flight": flight_peer(flight_port, identity, tiny, purpose),
        }
        loads: dict[str, list[LoadResult]] = {path: [] for path in sessions}
        memory = [rss_mib(server.pid)]
        for path, session in sessions.items():
            for count in options.peer_counts:
                loads[path].append(concurrent_load(session, count, options.load_seconds))
                memory.append(rss_mib(server.pid))
        threads = thread_count(server.pid)
    bare_port = free_port()
    with served(bare_process(pieces, tls, bare_port), bare_port, work / "bare.log") as bare:
        bare_cpu = server_cpu_per_call(bare.pid, bare_stream(bare_port, identity), options.repeat)
    with served(bare_process(tiny_messages, tls, bare_port), bare_port, work / "bare.log"):
        floors = {
            f"bare grpcio stream of the tiny answer's {message_count} messages": bare_stream(
                bare_port, identity
            ),
            "DuckDB running the tiny query in-process": duckdb_query(tiny),
            "one fsync of an audit line": fsync_append(work),
        }
        floor_ms = {
            name: percentile(tiny_latencies(once, options.tiny), 0.5) * 1000
            for name, once in floors.items()
        }
    decisions = decision_seconds(provider, "grantee", tiny, purpose, options.decisions)
    bare_median = statistics.median(bare_cpu)
    lines.append(f"server CPU per big call ({size / 1e6:.0f} MB of Arrow IPC), seconds:")
    lines.append(f"  connector serve   {spread(connector_cpu)}")
    lines.append(f"  bare grpcio       {spread(bare_cpu)}")
    if bare_median > 0:
        ratio = statistics.median(connector_cpu) / bare_median
        lines.append(f"  ratio: {ratio:.2f}x bare grpcio (target <= 1.3x)")
    else:  # under one clock tick: too few --rows to compare
        lines.append("  ratio: not measured (the bare server used less than one clock tick)")
    for path, times in tiny_times.items():
        ms = [t * 1000 for t in times]
        lines.append(
            f"tiny query, {path}, {len(ms)} calls: p50 {percentile(ms, 0.5):.2f} ms, "
            f"p99 {percentile(ms, 0.99):.2f} ms (target p50 <= 2 ms)"
        )
    lines.append(
        "what every tiny answer needs, each alone (p50): "
        + ", ".join(f"{name} {ms:.2f} ms" for name, ms in floor_ms.items())
        + f"; together {sum(floor_ms.values()):.2f} ms"
    )
    us = [t * 1e6 for t in decisions]
    lines.append(
        f"decision again for the same request: p50 {percentile(us, 0.5):.1f} us, "
        f"p99 {percentile(us, 0.99):.1f} us (target <= 20 us)"
    )
    for path, path_loads in loads.items():
        lines.extend(load_lines(path, path_loads))
    after = [f"{m:.0f} after {n} {path} peers" for (path, n), m in zip(
        [(path, n) for path in loads for n in options.peer_counts], memory[1:], strict=True
    )]  # fmt: skip
    lines.append(
        f"server RSS, MiB: {memory[0]:.0f} before the loads, "
        + ", ".join(after)
        + f" ({(memory[-1] / memory[0] - 1) * 100:+.0f}% at the end; target within 10%); "
        f"{threads} threads after the loads"
    )
    return lines


def main() -> None:
    """Measure the control path alone, on a small data space built for it."""
    from bench.stream import DATASET, PURPOSE, build_space  # stream imports this module
    from connector.config import load_settings

    parser = argparse.ArgumentParser(
        description="The control path of `make bench`, alone, on a small data space of its own."
    )
    args = bench_arguments(parser, rows=1_000_000).parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="connector-control-"))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # the set-up's CLI output
            provider, grantee = build_space(work, args.rows)
        settings = load_settings(provider)
        identity = PeerIdentity.from_home(grantee)
        options = ControlSettings.from_arguments(args)
        tls = (settings.cert, settings.key, settings.ca)
        tiny = f"SELECT plant, defects FROM {DATASET} LIMIT 1"
        queries = (f"SELECT * FROM {DATASET}", tiny, PURPOSE)
        for line in measure_control(work, provider, identity, tls, queries, options):
            print(line)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
