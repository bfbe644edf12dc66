"""`make bench`: stream a large result from a connector over mutual TLS, against two anchors.

All three read the same rows of the same DuckDB file in the same run:
  local DuckDB   the provider's file opened read-only, rows fetched as Arrow batches in-process
                 (the floor: no network, no policy, no encoding);
  Arrow Flight   a plain pyarrow Flight server over gRPC with the same mutual TLS certificates,
                 streaming the same query (what a bare Arrow-over-gRPC service costs);
  connector      the full path: mTLS, SQL guard, Rego decision, sandboxed per-request views,
                 plan check, Arrow IPC pieces in protobuf messages, signed receipt;
  Flight SQL     the same path on the connector's Arrow Flight SQL port, read with pyarrow's
                 FlightClient and with ADBC's Flight SQL driver (DB-API fetch_arrow_table).
A second grant shapes the same rows (part_no hashed, a row filter every row passes): its
first query builds the shaped copy, measured against local DuckDB computing the same masked
rows; later queries read the copy.
Servers and clients share this process and the machine's cores; the ratios are what to read.
Then bench.control measures the control path against `connector serve` in its own process.
"""

from __future__ import annotations

# First: the package sets up the native allocators before duckdb and pyarrow load (see
# connector/__init__.py).
import connector  # noqa: F401

# isort: split

import argparse
import contextlib
import io
import logging
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow.flight as flight

from bench.control import ControlSettings, bench_arguments, measure_control
from bench.flight_clients import adbc_fetch, flight_client_fetch
from connector.cli.main import main as cli
from connector.client import Peer, PeerIdentity
from connector.config import load_settings
from connector.server import start_server
from connector.shaping import hmac_sql, load_mask_key

DATASET = "part_events"
PURPOSE = "benchmarking"
SHAPED_PURPOSE = "shaped-benchmarking"
BATCH_ROWS = 65_536
SHAPED_FIRST = "connector stream, masked, first"
SHAPED = "connector stream, masked"
FLIGHT_SQL = "connector Flight SQL, FlightClient"
FLIGHT_SQL_ADBC = "connector Flight SQL, ADBC"


@dataclass(frozen=True)
class Measurement:
    """Median seconds over the repeats, and the rows and Arrow bytes one run moved."""

    name: str
    seconds: float
    rows: int
    arrow_bytes: int
    fastest: float = 0.0
    slowest: float = 0.0


def run(*args: str | Path) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        status = cli([str(a) for a in args])
    if status != 0:
        raise SystemExit(f"set-up step failed: connector {' '.join(map(str, args))}")


def build_space(work: Path, rows: int) -> tuple[Path, Path]:
    """A data space with a provider holding `rows` rows and a grantee allowed to read them."""
    run("dataspace", "init", work / "ca", "--name", "bench-space")
    provider, grantee = work / "provider", work / "grantee"
    run("init", provider, "--member", "provider", "--dataspace", work / "ca")
    run("init", grantee, "--member", "grantee", "--dataspace", work / "ca")
    parquet = work / "events.parquet"
    duckdb.sql(
        f"""COPY (SELECT 'Plant-' || (range % 7) AS plant, 'P-' || (range % 5000) AS part_no,
                  DATE '2026-01-05' + CAST(range % 280 AS INTEGER) AS day,
                  CAST(range % 13 AS INTEGER) AS defects, (range % 1000) / 10.0 AS cost
            FROM range({rows})) TO '{parquet}' (FORMAT parquet)"""
    )
    run("ingest", "--home", provider, parquet, "--dataset", DATASET)
    policy = provider / "policies" / "bench.yaml"
    policy.write_text(
        f"""id: bench
version: 1
description: Benchmark grant
datasets: [{DATASET}]
grantees: {{members: [grantee]}}
purposes: [{PURPOSE}]
valid: {{from: 2020-01-01, until: 2100-01-01}}
columns:
  allow: [plant, part_no, day, defects, cost]
"""
    )
    shaped = provider / "policies" / "bench-shaped.yaml"
    shaped.write_text(
        f"""id: bench-shaped
version: 1
description: Benchmark grant, masked and filtered
datasets: [{DATASET}]
grantees: {{members: [grantee]}}
purposes: [{SHAPED_PURPOSE}]
valid: {{from: 2020-01-01, until: 2100-01-01}}
columns:
  allow: [plant, day, defects, cost]
  mask: {{part_no: hash}}
rows: {{where: {{defects: {{gte: 0}}}}}}
"""
    )
    run("policy", "sign", "--home", provider, policy, shaped)
    return provider, grantee


def timed(name: str, repeat: int, once: Callable[[], tuple[int, int]]) -> Measurement:
    times, rows, size = [], 0, 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows, size = once()
        times.append(time.perf_counter() - started)
    return Measurement(name, statistics.median(times), rows, size, min(times), max(times))


def local_duckdb(database: Path, sql: str) -> Callable[[], tuple[int, int]]:
    def once() -> tuple[int, int]:
        con = duckdb.connect(str(database), read_only=True)
        rows = size = 0
        for batch in con.sql(sql).to_arrow_reader(BATCH_ROWS):
            rows += batch.num_rows
            size += batch.nbytes
        con.close()
        return rows, size

    return once


class DuckDBFlightServer(flight.FlightServerBase):  # type: ignore[misc]
    """A plain Flight server: one ticket = one SQL query on the provider's file."""

    def __init__(self, database: Path, tls: tuple[bytes, bytes, bytes]) -> None:
        cert, key, ca = tls
        super().__init__(
            "grpc+tls://127.0.0.1:0",
            tls_certificates=[flight.CertKeyPair(cert=cert, key=key)],
            verify_client=True,
            root_certificates=ca,
        )
        self._db = duckdb.connect(str(database), read_only=True)

    def close(self) -> None:
        """Shut down and release the file (another process serves it next)."""
        self.shutdown()
        self._db.close()

    def do_get(self, context: object, ticket: flight.Ticket) -> flight.RecordBatchStream:
        cursor = self._db.cursor()
        reader = cursor.sql(ticket.ticket.decode()).to_arrow_reader(BATCH_ROWS)
        return flight.RecordBatchStream(reader)


def flight_client(port: int, identity: PeerIdentity, sql: str) -> Callable[[], tuple[int, int]]:
    client = flight.FlightClient(
        f"grpc+tls://localhost:{port}",
        tls_root_certs=identity.ca_pem,
        cert_chain=identity.cert_pem,
        private_key=identity.key_pem,
    )

    def once() -> tuple[int, int]:
        rows = size = 0
        for chunk in client.do_get(flight.Ticket(sql.encode())):
            rows += chunk.data.num_rows
            size += chunk.data.nbytes
        return rows, size

    return once


def connector_stream(peer: Peer, sql: str, purpose: str = PURPOSE) -> Callable[[], tuple[int, int]]:
    def once() -> tuple[int, int]:
        pieces = []
        rows = 0
        for message in peer.stream(sql, purpose):
            if message.HasField("receipt"):
                rows = message.receipt.rows
            else:
                pieces.append(message.arrow_ipc)
        return rows, sum(len(p) for p in pieces)

    return once


def connector_table(peer: Peer, sql: str) -> Callable[[], tuple[int, int]]:
    def once() -> tuple[int, int]:
        table = peer.query(sql, PURPOSE)
        return table.num_rows, table.nbytes

    return once


def report(results: list[Measurement], flight_tls: str) -> None:
    base = {m.name: m.seconds for m in results}
    print(f"\n{'path':<34}{'rows':>11}{'seconds':>10}{'min-max':>14}{'Mrows/s':>10}{'MB/s':>9}")
    for m in results:
        print(
            f"{m.name:<34}{m.rows:>11,}{m.seconds:>10.3f}"
            f"{f'{m.fastest:.2f}-{m.slowest:.2f}':>14}{m.rows / m.seconds / 1e6:>10.2f}"
            f"{m.arrow_bytes / m.seconds / 1e6:>9.0f}"
        )
    print(
        f"Peer.query(): {base['connector query()'] / base['connector stream']:.2f}x the raw stub "
        "(target <= 1.5x)"
    )
    for name in ("connector stream", "connector query()", FLIGHT_SQL, FLIGHT_SQL_ADBC):
        print(
            f"{name}: {base[name] / base['local DuckDB']:.2f}x local DuckDB, "
            f"{base[name] / base['Arrow Flight']:.2f}x Arrow Flight ({flight_tls})"
        )
    local = base["local DuckDB, masked"]
    for name in (SHAPED_FIRST, SHAPED):
        print(
            f"{name}: {base[name] / local:.2f}x local DuckDB computing the masked rows, "
            f"{base[name] / base['Arrow Flight']:.2f}x Arrow Flight of the clear rows"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process (servers and clients together): {peak:.0f} MiB")
    print("servers and clients share this process and its cores; compare ratios, not seconds")


def measure(work: Path, rows: int, repeat: int, control: ControlSettings) -> None:
    provider, grantee = build_space(work, rows)
    settings = load_settings(provider)
    identity = PeerIdentity.from_home(grantee)
    provider_tls = (settings.cert.read_bytes(), settings.key.read_bytes(), settings.ca.read_bytes())
    sql_peer = f"SELECT * FROM {DATASET}"
    sql_owner = f'SELECT * FROM datasets."{DATASET}"'
    masked = hmac_sql("CAST(part_no AS VARCHAR)", load_mask_key(settings.mask_key))
    sql_owner_masked = (
        f"SELECT plant, {masked} AS part_no, day, defects, cost "
        f'FROM datasets."{DATASET}" WHERE defects >= 0'
    )
    # The anchors read a copy: the serving connector holds its file, and DuckDB attaches a
    # file once per process.
    anchor = work / "anchor.duckdb"
    shutil.copyfile(settings.database, anchor)
    server = start_server(settings, "127.0.0.1:0", "127.0.0.1:0")
    assert server.flight is not None
    flight_server = DuckDBFlightServer(anchor, provider_tls)
    threading.Thread(target=flight_server.serve, daemon=True).start()
    try:
        with (
            Peer(f"localhost:{server.port}", identity, timeout=600) as peer,
            adbc_fetch(server.flight.port, identity, sql_peer, PURPOSE) as adbc_once,
        ):
            results = [
                timed("local DuckDB", repeat, local_duckdb(anchor, sql_owner)),
                timed(
                    "Arrow Flight",
                    repeat,
                    flight_client(flight_server.port, identity, sql_owner),
                ),
                timed("connector stream", repeat, connector_stream(peer, sql_peer)),
                timed("connector query()", repeat, connector_table(peer, sql_peer)),
                timed(
                    FLIGHT_SQL,
                    repeat,
                    flight_client_fetch(server.flight.port, identity, sql_peer, PURPOSE),
                ),
                timed(FLIGHT_SQL_ADBC, repeat, adbc_once),
                timed(
                    "local DuckDB, masked",
                    repeat,
                    local_duckdb(anchor, sql_owner_masked),
                ),
                timed(SHAPED_FIRST, 1, connector_stream(peer, sql_peer, SHAPED_PURPOSE)),
                timed(SHAPED, repeat, connector_stream(peer, sql_peer, SHAPED_PURPOSE)),
            ]
    finally:
        flight_server.close()
        server.stop(grace=1)
    report(results, "mutual TLS")
    print("\ncontrol path (the connector in its own process):")
    tls = (settings.cert, settings.key, settings.ca)
    tiny = f"SELECT plant, defects FROM {DATASET} LIMIT 1"
    for line in measure_control(work, provider, identity, tls, (sql_peer, tiny, PURPOSE), control):
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = bench_arguments(parser, rows=5_000_000).parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="connector-bench-"))
    print(f"streaming {args.rows:,} rows, median of {args.repeat} runs, work folder {work}")
    try:
        control = ControlSettings.from_arguments(args)
        measure(work, args.rows, args.repeat, control)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
