"""`make bench`: one question to 10 members at once, against the slowest member alone.

Ten members run `connector serve` as their own processes on loopback; one holds many more
rows than the others and answers through a relay that holds back each reply by a fixed
delay (a member far away), so it is deliberately the slowest to answer. The client asks:
  slowest alone   the slow member only, through the same FederatedQuery path;
  federated       all ten at once (parallel, each with its own deadline), combined exactly;
and reports the federated time as a ratio to the slowest member alone (the goal: about 1).
Then every member is asked for all its rows and the answers are stacked (a union with
`_member`): the client's peak memory growth is reported against the size of the combined
answer (streamed: each member's bytes are decoded batch by batch, never held twice).
"""

from __future__ import annotations

# First: the package sets up the native allocators before duckdb and pyarrow load (see
# connector/__init__.py).
import connector  # noqa: F401

# isort: split

import argparse
import contextlib
import io
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import duckdb

from connector.cli.main import main as cli
from connector.client import PeerIdentity
from connector.federation import FederatedQuery, Target

DATASET = "part_events"
PURPOSE = "benchmarking"
MEMBERS = 10
AGGREGATE = (
    f"SELECT plant, count(*) AS n, sum(defects) AS defects, avg(cost) AS cost "
    f"FROM {DATASET} GROUP BY plant"
)
PORT_LINE = re.compile(r"serving on \S+ \(port (\d+)\)")


def run(*args: str | Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        status = cli([str(a) for a in args])
    if status != 0:
        raise SystemExit(f"set-up step failed: connector {' '.join(map(str, args))}")


def build_member(work: Path, member_id: str, rows: int) -> Path:
    """A member home holding `rows` rows, granting them to the asker."""
    home = work / member_id
    run("init", home, "--member", member_id, "--dataspace", work / "ca")
    parquet = work / f"{member_id}.parquet"
    duckdb.sql(
        f"""COPY (SELECT 'Plant-' || (range % 7) AS plant, CAST(range % 13 AS INTEGER) AS defects,
                  (range % 1000) / 10.0 AS cost, 'P-' || (range % 5000) AS part_no
            FROM range({rows})) TO '{parquet}' (FORMAT parquet)"""
    )
    run("ingest", "--home", home, parquet, "--dataset", DATASET)
    policy = home / "policies" / "bench.yaml"
    policy.write_text(
        f"""id: bench
version: 1
description: Benchmark grant
datasets: [{DATASET}]
grantees: {{members: [asker]}}
purposes: [{PURPOSE}]
valid: {{from: 2020-01-01, until: 2100-01-01}}
columns:
  allow: [plant, defects, cost, part_no]
limits: {{max_rows_per_query: 100000000}}
"""
    )
    run("policy", "sign", "--home", home, policy)
    return home


class Server:
    """`connector serve` for one home, in its own process."""

    def __init__(self, home: Path) -> None:
        command = [sys.executable, "-m", "connector.cli.main", "serve", "--home", str(home)]
        # Flight SQL off: new homes all default to one Flight port, and ten share this host.
        listen = ["--listen", "127.0.0.1:0", "--flight-listen", ""]
        self.process = subprocess.Popen([*command, *listen], stderr=subprocess.PIPE, text=True)
        self.port = 0
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            found = PORT_LINE.search(line)
            if found:
                self.port = int(found.group(1))
                self._ready.set()
        self._ready.set()

    def wait(self) -> int:
        if not self._ready.wait(120) or not self.port:
            raise SystemExit("a member's server did not start")
        return self.port

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class SlowRelay:
    """A TCP relay on loopback that forwards a member's replies only after `delay` seconds."""

    def __init__(self, port: int, delay: float) -> None:
        self._target = port
        self._delay = delay
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            for source, sink, delay in ((client, server, 0.0), (server, client, self._delay)):
                threading.Thread(target=self._pipe, args=(source, sink, delay), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, delay: float) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(1 << 16):
                if delay:
                    time.sleep(delay)
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


def timed(query: FederatedQuery, sql: str, repeat: int) -> tuple[float, int]:
    """Median seconds over repeat runs, and the answers' rows (every member must answer)."""
    times, rows = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        result = query.run(sql, PURPOSE)
        times.append(time.perf_counter() - started)
        failed = [f"{r.label}: {r.outcome} {r.detail}" for r in result.reports if not r.answered]
        if failed:
            raise SystemExit(f"members did not answer: {failed}")
        rows = sum(r.rows for r in result.reports)
    return statistics.median(times), rows


def rss_mib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


class PeakMemory:
    """The highest resident memory seen while a block runs (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.peak = self.start = rss_mib()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mib())

    def __enter__(self) -> PeakMemory:
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sampler.join()
        self.peak = max(self.peak, rss_mib())


def measure(work: Path, rows: int, slow_rows: int, repeat: int, delay: float) -> None:
    run("dataspace", "init", work / "ca", "--name", "bench-space")
    run("init", work / "asker", "--member", "asker", "--dataspace", work / "ca")
    sizes = {f"member-{i:02d}": rows for i in range(MEMBERS - 1)} | {"slow-member": slow_rows}
    homes = {member_id: build_member(work, member_id, n) for member_id, n in sizes.items()}
    servers = {member_id: Server(home) for member_id, home in homes.items()}
    try:
        relay = SlowRelay(servers["slow-member"].wait(), delay)
        targets = [
            Target(m, f"127.0.0.1:{relay.port if m == 'slow-member' else s.wait()}")
            for m, s in servers.items()
        ]
        identity = PeerIdentity.from_home(work / "asker")
        slow = [t for t in targets if t.label == "slow-member"]
        for query in (FederatedQuery(identity, targets), FederatedQuery(identity, slow)):
            query.run(AGGREGATE, PURPOSE)  # warm: connections, shaped views, caches
        alone, _ = timed(FederatedQuery(identity, slow), AGGREGATE, repeat)
        together, _ = timed(FederatedQuery(identity, targets), AGGREGATE, repeat)
        print(f"\n{'aggregate query':<34}{'seconds':>10}")
        print(f"{'slowest member alone':<34}{alone:>10.3f}")
        print(f"{f'{MEMBERS} members, combined':<34}{together:>10.3f}")
        print(f"federated time: {together / alone:.2f}x the slowest member alone")

        regular = [t for t in targets if t.label != "slow-member"]
        union = FederatedQuery(identity, regular, timeout=600)
        started = time.perf_counter()
        with PeakMemory() as memory:
            result = union.run(f"SELECT * FROM {DATASET}", PURPOSE)
        seconds = time.perf_counter() - started
        growth = memory.peak - memory.start
        size = result.table.nbytes / 2**20
        print(
            f"\nunion of {result.table.num_rows:,} rows from {len(regular)} members in "
            f"{seconds:.2f} s: the combined answer holds {size:.0f} MiB; the client's peak "
            f"memory grew {growth:.0f} MiB while receiving and combining "
            f"({growth / size:.2f}x the answer)"
        )
    finally:
        for server in servers.values():
            server.stop()
    print("the members' servers run as separate processes sharing this machine's cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000, help="rows of each member")
    parser.add_argument("--slow-rows", type=int, default=6_000_000, help="rows of the slow one")
    parser.add_argument(
        "--delay", type=float, default=0.1, help="seconds the slow member holds back each reply"
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="connector-federation-bench-"))
    print(
        f"{MEMBERS} members ({args.rows:,} rows each, one slow with {args.slow_rows:,} rows "
        f"and replies held back {args.delay:g} s), "
        f"median of {args.repeat} runs, work folder {work}"
    )
    try:
        measure(work, args.rows, args.slow_rows, args.repeat, args.delay)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
