"""`make demo`: a small manufacturing data space on loopback, queried by its members.

Three members (the car maker Northwind Motors and its suppliers Axle Works and Voltcell)
each get a home, load their example data, sign their policies and start a connector. Then
peers query each other: answered, refused for purpose, refused for a column, refused for
lack of any policy, a catalog and an explain. The data-space authority publishes the signed
member directory, and the data space's sustainability office asks all three members one
question at once: two answer, one refuses, and the answer says so member by member. Every
step is the real `connector` command line (run in this process; each connector serves in
a process of its own).
The servers are stopped when the demo ends, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from connector.cli.logs import TEXT_FORMAT
from connector.cli.main import main as cli

EXAMPLES = Path(__file__).resolve().parent
DATASPACE = "open-manufacturing"
MEMBERS = {
    "northwind-motors": (
        "part_defects.csv",
        "part_defects",
        "Incoming-inspection defects per plant, part and week",
    ),
    "axle-works": (
        "deliveries.csv",
        "deliveries",
        "Deliveries to customers: promised vs delivered",
    ),
    "voltcell": ("cell_tests.json", "cell_tests", "End-of-line battery cell test results per lot"),
}
ENERGY = ("plant_energy.csv", "plant_energy", "Energy use and CO2 per plant and month")
OFFICE = "sustainability-office"  # asks, holds no data, runs no connector
GRANT_ROLES = ("northwind-motors", "voltcell")  # their energy policies grant a role
ROLES = {"northwind-motors": "oem", "axle-works": "supplier", "voltcell": "supplier"}
NAMES = {"northwind-motors": "Northwind Motors", "axle-works": "Axle Works", "voltcell": "Voltcell"}
PORT_LINE = re.compile(r"serving on \S+ \(port (\d+)\)")
RELOADED = "policies loaded from"
FLIGHT_LINE = re.compile(r"Arrow Flight SQL on \S+ \(port (\d+)\)")


class _CurrentStderr(logging.StreamHandler[TextIO]):
    """Log records go to whatever sys.stderr is at the time: each step's own capture."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


def _capture_logs() -> None:
    # Commands run in this process: the command line's own logging set-up (once per
    # process, to the stderr of the moment) would keep writing to the first step's capture.
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def connector(
    *args: str | Path, check: bool = True, show: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run the real `connector` command line (in this process: starting Python for each of
    the demo's steps would take most of its time) and show it like a terminal would."""
    words = [str(a) for a in args]
    if show:
        print(f"\n$ connector {' '.join(_quote(w) for w in words)}", flush=True)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli(words)
        except SystemExit as exit_:  # usage errors end in argparse's exit
            status = exit_.code if isinstance(exit_.code, int) else 1
    done = subprocess.CompletedProcess(words, status, out.getvalue(), err.getvalue())
    if show:
        print(done.stdout, end="")
        for line in done.stderr.splitlines():
            if " INFO " not in line:
                print(line)
    if check and done.returncode != 0:
        raise SystemExit(f"demo step failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def _quote(text: str) -> str:
    return f'"{text}"' if re.search(r"[\s*;(),']", text) else text


@dataclass
class Server:
    """A `connector serve` process and the port it reported."""

    member: str
    process: subprocess.Popen[str]
    port: int = 0
    flight_port: int = 0
    log: list[str] = field(default_factory=list)
    reported: threading.Event = field(default_factory=threading.Event)  # its port, or its end

    def read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log.append(line)
            found = PORT_LINE.search(line)
            if found:
                self.port = int(found.group(1))
                self.reported.set()
            flight = FLIGHT_LINE.search(line)
            if flight:
                self.flight_port = int(flight.group(1))
        self.reported.set()


def start_server(member: str, home: Path) -> Server:
    """Start `connector serve` for member; wait_until_serving() waits for its port."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "connector.cli.main",
            "serve",
            "--home",
            str(home),
            "--listen",
            "127.0.0.1:0",
            "--flight-listen",
            "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    server = Server(member, process)
    threading.Thread(target=server.read, daemon=True).start()
    return server


def wait_until_serving(server: Server) -> None:
    if not server.reported.wait(timeout=60) or not server.port:
        raise SystemExit(f"{server.member}'s connector did not start:\n{''.join(server.log)}")
    print(f"  {server.member}: serving on 127.0.0.1:{server.port} (mutual TLS)")


def stop_servers(servers: list[Server]) -> None:
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()


def set_up(workdir: Path) -> dict[str, Path]:
    """The data space: CA, member homes, data, signed policies."""
    print("== 1. The data space and its members (development CA, one home per member)")
    if workdir.exists():
        shutil.rmtree(workdir)
    connector("dataspace", "init", workdir / "ca", "--name", DATASPACE)
    homes = {}
    for member, (data_file, dataset, description) in MEMBERS.items():
        home = homes[member] = workdir / member
        connector("init", home, "--member", member, "--dataspace", workdir / "ca")
        connector(
            "ingest",
            "--home",
            home,
            EXAMPLES / member / data_file,
            "--dataset",
            dataset,
            "--description",
            description,
        )
        if member in GRANT_ROLES:  # Axle Works keeps its energy figures to itself
            connector(
                "ingest", "--home", home, EXAMPLES / member / ENERGY[0], "--dataset", ENERGY[1],
                "--description", ENERGY[2], show=False,
            )  # fmt: skip
        for policy in sorted((EXAMPLES / member / "policies").glob("*.yaml")):
            shutil.copy(policy, home / "policies" / policy.name)
    connector("init", workdir / OFFICE, "--member", OFFICE, "--dataspace", workdir / "ca")
    print("\n== 2. Legal teams sign their usage policies; the connector checks them")
    for home in homes.values():
        connector("policy", "sign", "--home", home, *sorted((home / "policies").glob("*.yaml")))
    connector("policy", "verify", "--home", homes["northwind-motors"])
    print("\n   ... and test them against plain cases (no server, nothing written)")
    for member, home in homes.items():
        cases = EXAMPLES / member / "policy-cases.yaml"
        done = connector("policy", "test", "--home", home, cases, show=False)
        print(f"$ connector policy test --home {home} {cases}\n  {done.stdout.splitlines()[-1]}")
    return homes


def ask(
    command: str, home: Path, to: str, purpose: str, sql: str, *extra: str, refused: bool = False
) -> None:
    """A peer's `connector query|explain`; the demo fails if the outcome is not the expected one."""
    done = connector(
        command, "--home", home, "--to", to, "--purpose", purpose, *extra, sql, check=False
    )
    if (done.returncode != 0) != refused:
        raise SystemExit(f"demo step expected {'a refusal' if refused else 'an answer'}")


def ask_over_flight(home: Path, port: int, purpose: str, sql: str) -> None:
    """A data tool's way in: ADBC's Flight SQL driver with the member's certificate (pandas)."""
    import adbc_driver_flightsql.dbapi as flightsql
    from adbc_driver_flightsql import DatabaseOptions

    tls = {name: (home / "tls" / f"{name}.pem").read_text() for name in ("ca", "cert", "key")}
    options = {
        DatabaseOptions.TLS_ROOT_CERTS.value: tls["ca"],
        DatabaseOptions.MTLS_CERT_CHAIN.value: tls["cert"],
        DatabaseOptions.MTLS_PRIVATE_KEY.value: tls["key"],
        f"{DatabaseOptions.RPC_CALL_HEADER_PREFIX.value}x-connector-purpose": purpose,
    }
    uri = f"grpc+tls://localhost:{port}"
    print(f"$ python: adbc_driver_flightsql.dbapi.connect({uri!r}, ...) -> fetch_df()")
    with (
        flightsql.connect(uri, db_kwargs=options, autocommit=True) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(sql)
        frame = cursor.fetch_df()
    print(frame.to_string(index=False))
    print(f"{len(frame)} rows over Arrow Flight SQL")


def run_queries(
    homes: dict[str, Path], ports: dict[str, int], flight_ports: dict[str, int]
) -> None:
    northwind, axle, voltcell = (f"127.0.0.1:{ports[m]}" for m in MEMBERS)
    supplier, carmaker = homes["axle-works"], homes["northwind-motors"]
    print("\n== 4. Axle Works discovers what Northwind Motors shares with it")
    connector("catalog", "--home", supplier, "--to", northwind)

    print("\n== 5. Answered: Axle Works benchmarks its defect rate per Northwind plant")
    ask(
        "query",
        supplier,
        northwind,
        "quality-benchmarking",
        "SELECT plant, sum(defects) AS defects, sum(units_received) AS units, "
        "round(1e6 * sum(defects) / sum(units_received)) AS ppm FROM part_defects "
        "WHERE supplier = 'axle-works' GROUP BY plant ORDER BY ppm DESC",
    )
    print("\n== 5b. The same question from a data tool: Arrow Flight SQL with ADBC and pandas")
    ask_over_flight(
        supplier,
        flight_ports["northwind-motors"],
        "quality-benchmarking",
        "SELECT plant, sum(defects) AS defects FROM part_defects "
        "WHERE supplier = 'axle-works' GROUP BY plant ORDER BY plant",
    )
    print("\n== 6. Refused for purpose: the policy grants quality benchmarking, not marketing")
    ask(
        "query",
        supplier,
        northwind,
        "marketing",
        "SELECT plant, sum(defects) FROM part_defects GROUP BY plant",
        refused=True,
    )
    print("\n== 7. Refused for a column: prices are not granted")
    ask(
        "query",
        supplier,
        northwind,
        "quality-benchmarking",
        "SELECT part_no, avg(unit_price_eur) FROM part_defects GROUP BY part_no",
        refused=True,
    )
    print("\n== 8. Refused: Voltcell holds no policy for Axle Works' deliveries")
    ask(
        "query",
        homes["voltcell"],
        axle,
        "supply-planning",
        "SELECT * FROM deliveries",
        refused=True,
    )
    print("\n== 9. Refused: forbidden SQL never reaches the data (file access)")
    ask(
        "query",
        supplier,
        northwind,
        "quality-benchmarking",
        "SELECT * FROM read_csv('/etc/passwd')",
        refused=True,
    )
    print("\n== 10. Answered: Northwind Motors reads cell test results and delivery performance")
    ask(
        "query",
        carmaker,
        voltcell,
        "warranty-analysis",
        "SELECT line, cell_type, sum(failed) AS failed, sum(cells_tested) AS tested "
        "FROM cell_tests GROUP BY ALL ORDER BY line, cell_type",
    )
    ask(
        "query",
        carmaker,
        axle,
        "supply-planning",
        "SELECT plant, count(*) AS deliveries, avg(CASE WHEN on_time THEN 1 ELSE 0 END) AS "
        "on_time_share FROM deliveries WHERE customer = 'northwind-motors' GROUP BY plant "
        "ORDER BY plant",
        "--format",
        "csv",
    )
    benchmark = (
        "SELECT plant, defect_code, count(*) AS inspections, sum(defects) AS defects "
        "FROM part_defects GROUP BY plant, defect_code ORDER BY plant, defect_code"
    )
    print("\n== 11. Explain: Voltcell's grant is aggregate-only, masked and filtered")
    ask("explain", homes["voltcell"], northwind, "quality-benchmarking", benchmark)
    print("\n== 12. Answered in aggregates: groups of fewer than 20 inspections are dropped")
    ask("query", homes["voltcell"], northwind, "quality-benchmarking", benchmark)
    print("\n== 13. Refused: raw rows of an aggregate-only dataset")
    ask(
        "query",
        homes["voltcell"],
        northwind,
        "quality-benchmarking",
        "SELECT * FROM part_defects",
        refused=True,
    )


def publish_directory(workdir: Path, homes: dict[str, Path], servers: list[Server]) -> None:
    """The authority lists the members in the signed directory; every home takes it."""
    print("\n== 15. The data-space authority publishes the signed member directory")
    ca = workdir / "ca"
    for server in servers:
        connector(
            "dataspace", "member", "add", ca, server.member, "--endpoint",
            f"127.0.0.1:{server.port}", "--role", ROLES[server.member], "--country", "DE",
            "--name", NAMES[server.member],
        )  # fmt: skip
    connector("dataspace", "member", "add", ca, OFFICE, "--role", "auditor", "--country", "DE")
    connector("dataspace", "publish", ca, "--out", ca / "directory.json")
    loads = {s.member: sum(RELOADED in line for line in s.log) for s in servers}
    # The members whose policies grant a role, and the office that asks --all, take it.
    for home in [*(homes[m] for m in GRANT_ROLES), workdir / OFFICE]:
        connector("directory", "update", "--home", home, ca / "directory.json", show=False)
    # The connectors reload their role grants when the directory they hold changes.
    deadline = time.monotonic() + 30
    for server in servers:
        if server.member not in GRANT_ROLES:
            continue
        while sum(RELOADED in line for line in server.log) <= loads[server.member]:
            if time.monotonic() > deadline:
                raise SystemExit(f"{server.member} did not take the new directory")
            time.sleep(0.1)


def ask_everyone(workdir: Path) -> None:
    """The sustainability office asks every member at once; one refuses."""
    print("\n== 16. The sustainability office asks all three members at once (--all)")
    office = workdir / OFFICE
    done = connector(
        "query", "--home", office, "--all", "--purpose", "sustainability-reporting",
        "SELECT month, sum(kwh) AS kwh, sum(co2_kg) AS co2_kg, avg(co2_kg) AS co2_kg_per_plant "
        "FROM plant_energy GROUP BY month ORDER BY month",
        "--output", workdir / "energy.csv", "--format", "csv",
    )  # fmt: skip
    if "INCOMPLETE: 2 of 3 members answered" not in done.stderr:
        raise SystemExit("demo step expected two answers and one refusal")
    print((workdir / "energy.csv").read_text(), end="")
    receipts = workdir / "energy.csv.receipts.json"
    connector("receipt", "verify", receipts, "--data", workdir / "energy.csv", "--home", office)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-space"))
    parser.add_argument("--keep-running", action="store_true", help="serve until Ctrl-C")
    args = parser.parse_args()
    _capture_logs()
    homes = set_up(args.workdir.resolve())
    servers: list[Server] = []
    try:
        print("\n== 3. Each member starts its connector")
        # All at once: each takes a second or two to start, mostly loading Python modules.
        servers.extend(start_server(member, home) for member, home in homes.items())
        for server in servers:
            wait_until_serving(server)
        run_queries(
            homes,
            {s.member: s.port for s in servers},
            {s.member: s.flight_port for s in servers},
        )
        print("\n== 14. Northwind's IT team sees who used what, and checks the record is whole")
        connector("audit", "show", "--home", homes["northwind-motors"])
        connector("audit", "verify", "--home", homes["northwind-motors"])
        publish_directory(args.workdir.resolve(), homes, servers)
        ask_everyone(args.workdir.resolve())
        if args.keep_running:
            print("\nServing until Ctrl-C; homes are in", args.workdir)
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        stop_servers(servers)
        print("\nAll connectors stopped. Member homes stay in", args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
