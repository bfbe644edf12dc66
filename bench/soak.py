"""`make soak`: a bounded mixed load against a real `connector serve`, measured every 10 s.

A throwaway data space (one provider, four granted peer members and a prober) is built with
the real CLI, the provider's connector runs as a subprocess on loopback, and peer threads
send a mix of requests: catalog, small, shaped (masked and filtered), aggregate-only and
100k-row queries, Explain, client cancellations and short deadlines. 8 peers for the first
third of the time, then 32. Refused and forbidden queries come from the prober, a member
with no grant (one prober thread for every 8 peers): a member whose requests keep being
refused is held back as a whole for a while (audit_refusals.py), so mixing them into the granted
members' traffic would measure that penalty instead of the load. A policy is edited and
re-signed every 30 s and the server gets SIGHUP every minute. Every 10 s the server's RSS,
fds, threads, scratch file size, requests per second and errors by status code are sampled.

At the end: the memory slope after warm-up (least squares), whether memory returns near its
idle level once the load stops, and the audit log checked against what the peers received.
Exits non-zero when a check fails. Bounded in time; the server is killed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import grpc
import pyarrow as pa

from connector._proto.connector.v1 import connector_pb2 as pb
from connector._proto.connector.v1 import connector_pb2_grpc as pb_grpc
from connector.audit_chain import read_entries
from connector.cli.main import main as cli
from connector.client import PeerIdentity
from connector.config import load_settings

DATASET = "events"
PLAIN, SHAPED, AGGREGATE = "analysis", "shaped-analysis", "aggregate-analysis"
MEMBERS = ("alpha", "beta", "gamma", "delta")
PROBER = "prober"  # a member of the data space that no policy names
PROBING = ("refused", "forbidden")
PEERS_PER_PROBER = 8
CONNECTOR = (sys.executable, "-m", "connector.cli.main")
PORT_LINE = re.compile(r"serving on \S+ \(port (\d+)\)")
LARGE_ROWS = 100_000
OK = "OK"
# Memory a connector needs beyond DuckDB's memory_limit: Python, pyarrow and gRPC buffers of
# the streams in flight, the Rego engine. Stated in the README; the soak checks it.
OVERHEAD_MB = 400
FLAT_BAND = 0.10  # after warm-up, max/min of RSS
IDLE_RETURN = 1.25  # after the load, RSS within this factor of the idle level (+ 32 MB)


@dataclass(frozen=True)
class Kind:
    """One kind of request: how often it is sent and which status codes are expected."""

    name: str
    weight: int
    expected: frozenset[str]


KINDS = {
    k.name: k
    for k in (
        Kind("catalog", 1, frozenset({OK})),
        Kind("small", 3, frozenset({OK})),
        Kind("rows", 2, frozenset({OK})),
        Kind("shaped", 2, frozenset({OK})),
        Kind("aggregate", 2, frozenset({OK})),
        Kind("large", 1, frozenset({OK})),
        # The prober's; RESOURCE_EXHAUSTED once it is held back for too many refusals.
        Kind("refused", 1, frozenset({"PERMISSION_DENIED", "RESOURCE_EXHAUSTED"})),
        Kind("forbidden", 1, frozenset({"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"})),
        Kind("explain", 1, frozenset({OK})),
        Kind("cancel", 1, frozenset({"CANCELLED", OK})),
        Kind("deadline", 1, frozenset({"DEADLINE_EXCEEDED", OK})),
    )
}
QUERIES = {
    "small": (
        PLAIN,
        f"SELECT plant, count(*) AS n, sum(defects) AS d FROM {DATASET} GROUP BY plant",
    ),
    "rows": (PLAIN, f"SELECT * FROM {DATASET} WHERE defects = 3 LIMIT 500"),
    "shaped": (
        SHAPED,
        f"SELECT plant, part_no, sum(defects) AS d FROM {DATASET} GROUP BY ALL "
        "ORDER BY d DESC LIMIT 200",
    ),
    "aggregate": (
        AGGREGATE,
        f"SELECT plant, day, sum(defects) AS d FROM {DATASET} GROUP BY plant, day",
    ),
    "large": (PLAIN, f"SELECT * FROM {DATASET} LIMIT {LARGE_ROWS}"),
    "refused": ("marketing", f"SELECT plant, sum(defects) FROM {DATASET} GROUP BY plant"),
    "forbidden": (PLAIN, "SELECT * FROM read_csv('/etc/passwd')"),
    "explain": (SHAPED, f"SELECT plant, count(*) FROM {DATASET} GROUP BY plant"),
    "cancel": (PLAIN, f"SELECT * FROM {DATASET} ORDER BY cost, part_no LIMIT {LARGE_ROWS}"),
    "deadline": (PLAIN, f"SELECT * FROM {DATASET} ORDER BY cost, part_no LIMIT {LARGE_ROWS}"),
}


# ---------------------------------------------------------------------------- data space


def run(*args: str | Path) -> None:
    """The connector CLI in-process, quiet; a failed step ends the soak."""
    with contextlib.redirect_stdout(io.StringIO()):
        status = cli([str(a) for a in args])
    if status != 0:
        raise SystemExit(f"set-up step failed: connector {' '.join(map(str, args))}")


def shaped_policy(version: int, reshape: bool = True) -> str:
    """The policy re-signed during the soak. With reshape, each version filters rows
    differently (a bound every row passes, and a varying one), so each builds a new shaped
    copy, as a legal team's edit of a filter does; without, only the version changes."""
    bound = f"{{gte: {version % 4}}}, cost: {{lt: {100 + version}}}" if reshape else "{gte: 0}"
    return f"""id: soak-shaped
version: {version}
description: Masked and filtered grant, edited during the soak
datasets: [{DATASET}]
grantees: {{members: [{", ".join(MEMBERS)}]}}
purposes: [{SHAPED}]
valid: {{from: 2020-01-01, until: 2100-01-01}}
columns:
  allow: [plant, day, defects, cost]
  mask: {{part_no: hash}}
rows: {{where: {{defects: {bound}}}}}
"""


def build_space(work: Path, rows: int) -> tuple[Path, list[Path]]:
    """A provider holding `rows` rows, three signed policies, and the peers' homes (the
    prober's last)."""
    run("dataspace", "init", work / "ca", "--name", "soak-space")
    provider = work / "provider"
    run("init", provider, "--member", "provider", "--dataspace", work / "ca")
    peers = []
    for member in (*MEMBERS, PROBER):
        run("init", work / member, "--member", member, "--dataspace", work / "ca")
        peers.append(work / member)
    parquet = work / "events.parquet"
    duckdb.sql(
        f"""COPY (SELECT 'Plant-' || (range % 7) AS plant, 'P-' || (range % 5000) AS part_no,
                  DATE '2026-01-05' + CAST(range % 280 AS INTEGER) AS day,
                  CAST(range % 13 AS INTEGER) AS defects, (range % 1000) / 10.0 AS cost
            FROM range({rows})) TO '{parquet}' (FORMAT parquet)"""
    )
    run("ingest", "--home", provider, parquet, "--dataset", DATASET)
    grantees = ", ".join(MEMBERS)
    policies = provider / "policies"
    (policies / "soak-plain.yaml").write_text(
        f"""id: soak-plain
version: 1
description: Plain grant
datasets: [{DATASET}]
grantees: {{members: [{grantees}]}}
purposes: [{PLAIN}]
valid: {{from: 2020-01-01, until: 2100-01-01}}
columns:
  allow: [plant, part_no, day, defects, cost]
limits: {{max_rows_per_query: {LARGE_ROWS}}}
"""
    )
    (policies / "soak-aggregate.yaml").write_text(
        f"""id: soak-aggregate
version: 1
description: Aggregate-only grant
datasets: [{DATASET}]
grantees: {{members: [{grantees}]}}
purposes: [{AGGREGATE}]
valid: {{from: 2020-01-01, until: 2100-01-01}}
columns:
  allow: [plant, day, defects, cost]
aggregate_only: {{min_group_size: 5}}
"""
    )
    (policies / "soak-shaped.yaml").write_text(shaped_policy(1))
    run("policy", "sign", "--home", provider, *sorted(policies.glob("*.yaml")))
    return provider, peers


# ---------------------------------------------------------------------------- the server


@dataclass
class Server:
    """A `connector serve` subprocess; its log goes to a file."""

    home: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    port: int = 0

    def start(self, timeout: float = 60) -> float:
        """Start and wait for the port line; returns the seconds it took."""
        started = time.monotonic()
        before = self._port_lines()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            # The Flight SQL port off: the soak drives the gRPC port (and a fixed port clashes).
            [
                *CONNECTOR,
                "serve",
                "--home",
                str(self.home),
                "--listen",
                "127.0.0.1:0",
                "--flight-listen",
                "",
            ],
            stderr=log,
            stdout=log,
        )
        log.close()
        while time.monotonic() - started < timeout:
            found = self._port_lines()
            if len(found) > len(before) and self.process.poll() is None:
                self.port = int(found[-1])
                return time.monotonic() - started
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise SystemExit(f"the connector did not start; see {self.log_path}")

    def _port_lines(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return PORT_LINE.findall(self.log_path.read_text(errors="replace"))

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 20) -> float:
        """SIGTERM and wait; returns the seconds it took (killed after timeout)."""
        if self.process is None or self.process.poll() is not None:
            return 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return time.monotonic() - started

    def kill(self) -> None:
        """Kill the server if it still runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass(frozen=True)
class Sample:
    """One measurement of the server process and the load."""

    at: float
    phase: str
    rss_mb: float
    fds: int
    threads: int
    scratch_mb: float
    rps: float
    errors: dict[str, int]


def process_figures(pid: int) -> tuple[float, int, int]:
    """RSS in MB, open file descriptors and threads of a process, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd")), threads


def scratch_mb(home: Path) -> float:
    """Size of the shaped-copy scratch file (and its WAL) in MB."""
    state = home / "state"
    return sum(p.stat().st_size for p in state.glob("shaped.duckdb*") if p.is_file()) / 1e6


# ---------------------------------------------------------------------------- the peers


@dataclass
class Outcome:
    """What one request got back."""

    kind: str
    member: str
    request_id: str
    code: str
    audit_seq: int = 0
    receipt_request_id: str = ""
    receipt_rows: int = -1
    rows_received: int = -1


@dataclass
class Tally:
    """Every request sent and its outcome; thread-safe."""

    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def unexpected(self) -> Counter[str]:
        with self.lock:
            return Counter(o.code for o in self.outcomes if o.code not in KINDS[o.kind].expected)


class PeerClient:
    """One peer: its own channel under one member's certificate."""

    def __init__(self, address: str, home: Path) -> None:
        self.member = home.name  # build_space names each member's home after it
        identity = PeerIdentity.from_home(home)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=identity.ca_pem,
            private_key=identity.key_pem,
            certificate_chain=identity.cert_pem,
        )
        self.channel = grpc.secure_channel(
            address, credentials, options=[("grpc.max_receive_message_length", 64 << 20)]
        )
        self.stub = pb_grpc.ConnectorStub(self.channel)

    def send(self, kind: str, rng: random.Random) -> Outcome:
        """Send one request of this kind and return what came back."""
        request_id = str(uuid.uuid4())
        outcome = Outcome(kind, self.member, request_id, OK)
        try:
            if kind == "catalog":
                self.stub.GetCatalog(pb.CatalogRequest(), timeout=60)
                outcome.request_id = ""
                return outcome
            purpose, sql = QUERIES[kind]
            request = pb.QueryRequest(sql=sql, purpose=purpose, request_id=request_id)
            if kind == "explain":
                self.stub.Explain(request, timeout=60)
            elif kind == "cancel":
                call = self.stub.Query(request, timeout=60)
                next(call)
                call.cancel()
                for _ in call:
                    pass
            else:
                timeout = rng.uniform(0.02, 0.2) if kind == "deadline" else 60
                self._query(request, timeout, outcome)
        except grpc.RpcError as error:
            outcome.code = error.code().name
        except StopIteration:
            pass
        return outcome

    def _query(self, request: pb.QueryRequest, timeout: float, outcome: Outcome) -> None:
        pieces = []
        for message in self.stub.Query(request, timeout=timeout):
            if message.HasField("receipt"):
                receipt = message.receipt
                outcome.audit_seq = receipt.audit_seq
                outcome.receipt_request_id = receipt.request_id
                outcome.receipt_rows = receipt.rows
            else:
                pieces.append(message.arrow_ipc)
        table = pa.ipc.open_stream(b"".join(pieces)).read_all()
        outcome.rows_received = table.num_rows

    def close(self) -> None:
        self.channel.close()


def peer_loop(
    client: PeerClient,
    kinds: list[str],
    stop: threading.Event,
    tally: Tally,
    pause: float,
    seed: int,
) -> None:
    """Send requests of weighted random kinds until stop, pausing between them."""
    rng = random.Random(seed)
    weights = [KINDS[k].weight for k in kinds]
    while not stop.is_set():
        kind = rng.choices(kinds, weights)[0]
        tally.add(client.send(kind, rng))
        stop.wait(rng.uniform(0, 2 * pause))


# ---------------------------------------------------------------------------- the operator


def resign(provider: Path, version: int, reshape: bool) -> None:
    """What a legal team does: edit a draft outside policies/, then publish it (signed and
    moved in with its signature in one step, so the grant never lapses)."""
    drafts = provider.parent / "drafts"
    drafts.mkdir(exist_ok=True)
    path = drafts / f"soak-shaped.v{version}.yaml"
    path.write_text(shaped_policy(version, reshape))
    done = subprocess.run(
        [*CONNECTOR, "policy", "publish", "--home", str(provider), str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        print(f"re-signing version {version} failed: {done.stderr.strip()}", flush=True)


def operator_loop(
    server: Server, stop: threading.Event, every_resign: float, every_hup: float, reshape: bool
) -> Counter[str]:
    """Re-sign the shaped policy and send SIGHUP on their schedules until stop."""
    done: Counter[str] = Counter()
    started = time.monotonic()
    next_resign, next_hup, version = every_resign, every_hup, 1
    while not stop.wait(0.5):
        elapsed = time.monotonic() - started
        if every_resign and elapsed >= next_resign:
            version += 1
            resign(server.home, version, reshape)
            done["re-signed"] += 1
            next_resign += every_resign
        if every_hup and elapsed >= next_hup:
            os.kill(server.pid, signal.SIGHUP)
            done["SIGHUP"] += 1
            next_hup += every_hup
    return done


# ---------------------------------------------------------------------------- the run


@dataclass
class Soak:
    """The whole run: server, peers, samples."""

    args: argparse.Namespace
    provider: Path
    peers: list[Path]
    server: Server
    tally: Tally = field(default_factory=Tally)
    samples: list[Sample] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    phase: str = "idle"

    def sample(self) -> Sample:
        rss, fds, threads = process_figures(self.server.pid)
        previous = self.samples[-1] if self.samples else None
        count = self.tally.count()
        now = time.monotonic() - self.started
        rps = 0.0
        if previous is not None and now > previous.at:
            rps = (count - self._last_count) / (now - previous.at)
        self._last_count = count
        sample = Sample(
            now,
            self.phase,
            rss,
            fds,
            threads,
            scratch_mb(self.provider),
            rps,
            dict(self.tally.unexpected()),
        )
        self.samples.append(sample)
        errors = " ".join(f"{c}={n}" for c, n in sorted(sample.errors.items())) or "-"
        print(
            f"{sample.at:7.0f}s {sample.phase:<9}{sample.rss_mb:8.0f} MB {sample.fds:5d} fds "
            f"{sample.threads:4d} thr {sample.scratch_mb:7.1f} MB scratch {sample.rps:7.1f} req/s"
            f"  unexpected: {errors}",
            flush=True,
        )
        return sample

    _last_count: int = 0

    def sample_for(self, seconds: float) -> None:
        """Sample every interval for seconds."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            time.sleep(max(0.0, min(self.args.interval, left)))
            self.sample()
            if time.monotonic() >= end - 0.5:
                return

    def load(self, peers: int, seconds: float, kinds: list[str]) -> None:
        """Run `peers` granted peer threads (and their probers) for seconds, sampling."""
        stop = threading.Event()
        address = f"127.0.0.1:{self.server.port}"
        *granted, prober = self.peers
        plain = [k for k in kinds if k not in PROBING]
        probing = [k for k in kinds if k in PROBING]
        loops: list[tuple[PeerClient, list[str]]] = []
        if plain:
            loops += [(PeerClient(address, granted[i % len(granted)]), plain) for i in range(peers)]
        if probing:
            probers = max(1, peers // PEERS_PER_PROBER)
            loops += [(PeerClient(address, prober), probing) for _ in range(probers)]
        threads = [
            threading.Thread(
                target=peer_loop,
                args=(c, which, stop, self.tally, self.args.pause, hash((peers, i))),
                daemon=True,
            )
            for i, (c, which) in enumerate(loops)
        ]
        for thread in threads:
            thread.start()
        try:
            self.sample_for(seconds)
        finally:
            stop.set()
            for thread in threads:
                thread.join(90)
            for client, _ in loops:
                client.close()


def slope_mb_per_min(samples: list[Sample]) -> float:
    """Least-squares slope of RSS against time, MB per minute."""
    if len(samples) < 2:
        return 0.0
    xs = [s.at / 60 for s in samples]
    ys = [s.rss_mb for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0


def memory_limit_mb(home: Path) -> float:
    """DuckDB's memory_limit from the connector's settings, in MB."""
    text = load_settings(home).server.memory_limit.strip().upper()
    number, unit = re.fullmatch(r"([\d.]+)\s*([KMGT]?I?B)", text).groups()  # type: ignore[union-attr]
    scale = {"KB": 1e-3, "MB": 1, "GB": 1e3, "TB": 1e6, "KIB": 1 / 1000, "MIB": 1.048576}
    scale |= {"GIB": 1073.741824, "TIB": 1.099511627776e6, "B": 1e-6}
    return float(number) * scale[unit]


# ---------------------------------------------------------------------------- the checks


def arrivals(server_log: Path) -> int:
    """Connector requests that reached the server, as it says when it stops."""
    found = re.findall(r"stopped after (\d+) connector requests", server_log.read_text())
    return sum(int(n) for n in found)


def check_audit(
    provider: Path, outcomes: list[Outcome], arrived: int
) -> list[tuple[str, bool, str]]:
    """The audit log against what the peers received, and `connector audit verify`."""
    settings = load_settings(provider)
    everything = list(read_entries(settings.audit_log))
    entries = [e for e in everything if e.get("type") == "request"]
    # A member's refusals beyond its allowance are counted in "refusals" entries, not one
    # by one (audit_refusals.py): those count for the member's requests that have no entry
    # of their own.
    counted: Counter[str] = Counter()
    for aggregate in everything:
        if aggregate.get("type") == "refusals":
            counted[str(aggregate.get("member_id"))] += int(aggregate.get("count", 0))
    by_seq = {e["seq"]: e for e in entries}
    # The connector assigns request ids; the peer's own id is kept as client_reference.
    by_request = {e.get("client_reference"): e for e in entries if e.get("kind") != "catalog"}
    answered = [o for o in outcomes if o.code == OK and o.receipt_rows >= 0]
    wrong = [
        o
        for o in answered
        if (e := by_seq.get(o.audit_seq)) is None
        or e.get("client_reference") != o.request_id
        or o.receipt_request_id != e.get("request_id")
        or e.get("rows") != o.receipt_rows
        or o.rows_received != o.receipt_rows
        or e.get("outcome") != "answered"
    ]
    sent = [o for o in outcomes if o.kind != "catalog"]
    unmatched = [o for o in sent if o.request_id not in by_request]
    missing = Counter(f"{o.kind}/{o.code}" for o in unmatched if o.code == OK)
    # A request refused before its message was read (busy or held back at admission, or
    # expired) has an entry without the peer's request id: it counts for that member too.
    left = counted.copy()
    for e in entries:
        if e.get("kind") != "catalog" and not e.get("client_reference"):
            left[str(e.get("member_id"))] += 1
    for o in unmatched:
        if o.code == OK:
            continue
        if left[o.member] > 0:
            left[o.member] -= 1
        else:
            missing[f"{o.kind}/{o.code}"] += 1
    # A request whose deadline passes in the peer's own process or on the way never reaches
    # the connector: only those may be missing, and no more than the requests that did not
    # arrive (what was sent less what the server counted arriving).
    never_arrived = len(outcomes) - arrived
    lost_on_the_way = sum(n for what, n in missing.items() if what.endswith("/DEADLINE_EXCEEDED"))
    unexplained = sum(missing.values()) - lost_on_the_way
    on_record = len(entries) + sum(counted.values())
    unread = sum(1 for e in entries if e.get("kind") != "catalog" and not e.get("client_reference"))
    catalogs_sent = sum(o.kind == "catalog" for o in outcomes)
    catalogs_logged = sum(e.get("kind") == "catalog" for e in entries) + sum(left.values())
    interrupted = Counter(
        by_request[o.request_id].get("outcome")
        for o in sent
        if o.code in ("CANCELLED", "DEADLINE_EXCEEDED") and o.request_id in by_request
    )
    with contextlib.redirect_stdout(io.StringIO()) as said:
        verified = cli(["audit", "verify", "--home", str(provider)]) == 0
    print(
        f"audit: {len(entries):,} request entries for {len(outcomes):,} requests sent; "
        f"interrupted queries on record as {dict(interrupted)}"
    )
    return [
        (
            "every answered query's receipt (audit_seq, request id, rows) is in the audit log",
            not wrong,
            f"{len(answered) - len(wrong):,} of {len(answered):,}",
        ),
        (
            "every request that reached the connector is on record (own entry or counted)",
            on_record == arrived,
            f"{on_record:,} on record for {arrived:,} arrived ({len(outcomes):,} sent)",
        ),
        (
            "every query/explain sent is on record, but for deadlines that passed before it "
            "reached the connector",
            not unexplained and lost_on_the_way <= max(0, never_arrived),
            f"{dict(missing)} without a record; {never_arrived:,} sent never arrived"
            if missing
            else f"all {len(sent):,} ({unread:,} refused before their message was read: an "
            "entry without the peer's request id)",
        ),
        (
            "every catalog request is in the audit log (one by one, or counted when throttled)",
            catalogs_logged >= catalogs_sent,
            f"{catalogs_logged:,} entries for {catalogs_sent:,} sent",
        ),
        (
            "interrupted queries are on record as what the server did before the interrupt "
            "(cancelled, timed out, expired, refused, or answered in full), never as failed",
            "failed" not in interrupted,
            f"{dict(interrupted)}",
        ),
        ("connector audit verify", verified, said.getvalue().strip().split(": ", 1)[-1]),
    ]


def check_memory(soak: Soak, idle_mb: float, limit_mb: float) -> list[tuple[str, bool, str]]:
    """Memory flat after warm-up, under the limit plus overhead, back near idle after."""
    steady = [s for s in soak.samples if s.phase == "steady"]
    loaded = [s for s in soak.samples if s.phase in ("warm-up", "steady")]
    after = [s for s in soak.samples if s.phase == "after"]
    peak = max(s.rss_mb for s in loaded)
    low, high = min(s.rss_mb for s in steady), max(s.rss_mb for s in steady)
    end = after[-1].rss_mb if after else peak
    print(
        f"memory: idle {idle_mb:.0f} MB, peak {peak:.0f} MB, after warm-up {low:.0f}-{high:.0f} "
        f"MB, slope after warm-up {slope_mb_per_min(steady):+.1f} MB/min "
        f"(whole load {slope_mb_per_min(loaded):+.1f} MB/min), {end:.0f} MB after the load"
    )
    # Single samples swing with the results in flight (a 100k-row answer is several MB):
    # the fitted line's rise over the steady window is what must stay within the band.
    minutes = (steady[-1].at - steady[0].at) / 60 if len(steady) > 1 else 0.0
    rise = slope_mb_per_min(steady) * minutes
    mean = sum(s.rss_mb for s in steady) / len(steady)
    return [
        (
            f"memory after warm-up within {FLAT_BAND:.0%} (fitted rise over the steady window)",
            rise <= mean * FLAT_BAND,
            f"{rise:+.0f} MB over {minutes:.1f} min on a mean of {mean:.0f} MB "
            f"(samples {low:.0f}-{high:.0f} MB)",
        ),
        (
            f"peak memory under memory_limit + {OVERHEAD_MB} MB",
            peak <= limit_mb + OVERHEAD_MB,
            f"{peak:.0f} MB <= {limit_mb + OVERHEAD_MB:.0f} MB",
        ),
        (
            "memory returns near idle after the load",
            end <= idle_mb * IDLE_RETURN + 32,
            f"{end:.0f} MB (idle {idle_mb:.0f} MB)",
        ),
    ]


def check_outcomes(soak: Soak) -> list[tuple[str, bool, str]]:
    """Status codes by kind; no INTERNAL/UNKNOWN; granted queries not refused."""
    outcomes = soak.tally.outcomes
    by_kind: dict[str, Counter[str]] = {}
    for o in outcomes:
        by_kind.setdefault(o.kind, Counter())[o.code] += 1
    print("requests by kind and status:")
    for kind, codes in sorted(by_kind.items()):
        print(f"  {kind:<10}" + "  ".join(f"{c}={n}" for c, n in codes.most_common()))
    broken = sum(o.code in ("INTERNAL", "UNKNOWN") for o in outcomes)
    shaped_refused = by_kind.get("shaped", Counter())["PERMISSION_DENIED"]
    busy = sum(o.code == "RESOURCE_EXHAUSTED" for o in outcomes)
    return [
        ("no INTERNAL or UNKNOWN seen by peers", not broken, f"{broken}"),
        (
            "no granted query refused while its policy was re-signed",
            not shaped_refused,
            f"{shaped_refused} refused",
        ),
        ("(figure) refused as busy (RESOURCE_EXHAUSTED)", True, f"{busy}"),
    ]


def report(checks: list[tuple[str, bool, str]]) -> bool:
    """Print the checks; True when all pass."""
    print("checks:")
    for name, passed, detail in checks:
        print(f"  {'ok  ' if passed else 'FAIL'} {name}: {detail}")
    return all(passed for _, passed, _ in checks)


def soak(args: argparse.Namespace, work: Path) -> bool:
    """Build, start, load, measure, stop, check; True when every check passes."""
    provider, peers = build_space(work, args.rows)
    server = Server(provider, work / "server.log")
    kinds = args.only or list(KINDS)
    try:
        start_seconds = server.start()
        run_ = Soak(args, provider, peers, server)
        print(f"server pid {server.pid} started in {start_seconds:.1f} s; log {server.log_path}")
        print(f"{'time':>8} {'phase':<9}{'RSS':>8}    {'fds':>5}     {'thr':>4}")
        run_.sample()
        address = f"127.0.0.1:{server.port}"
        first_peer = PeerClient(address, peers[0])
        first_prober = PeerClient(address, peers[-1])
        for kind in kinds:  # one of each kind, then the idle level
            client = first_prober if kind in PROBING else first_peer
            run_.tally.add(client.send(kind, random.Random(0)))
        first_peer.close()
        first_prober.close()
        # The idle level: after a short load at the full number of peers and a quiet spell.
        # Worker threads, their allocator caches (about 4 MB each, kept by the C and C++
        # allocators for reuse) and DuckDB's block cache then have their working size;
        # what stays above this level after the load is growth.
        run_.load(args.peers[1], 2 * args.interval, kinds)
        run_.sample_for(2 * args.interval)
        idle_mb = run_.samples[-1].rss_mb
        stop_operator = threading.Event()
        operated: Counter[str] = Counter()
        operator = threading.Thread(
            target=lambda: operated.update(
                operator_loop(
                    server, stop_operator, args.resign_every, args.hup_every, not args.same_shape
                )
            ),
            daemon=True,
        )
        operator.start()
        few, many = args.peers
        first = args.duration / 3
        run_.phase = "warm-up"
        run_.load(few, first, kinds)
        run_.phase = "warm-up"
        warm = min(args.warmup, args.duration - first - args.interval)
        # The many-peer phase: its first `warm` seconds count as warm-up, the rest as steady.
        timer = threading.Timer(warm, lambda: setattr(run_, "phase", "steady"))
        timer.start()
        run_.load(many, args.duration - first, kinds)
        timer.cancel()
        stop_operator.set()
        operator.join(30)
        run_.phase = "after"
        run_.sample_for(args.idle)
        stop_seconds = server.stop()
        restart_seconds = server.start()
        time.sleep(2)
        restarted_mb, _, _ = process_figures(server.pid)
        restarted_scratch = scratch_mb(provider)
        server.stop()
    finally:
        server.kill()
    elapsed = run_.samples[-1].at
    total = len(run_.tally.outcomes)
    print(
        f"\n{total:,} requests in {elapsed / 60:.1f} min from {few} then {many} peers "
        f"(mean {total / max(1.0, elapsed - args.idle):.1f}/s); {dict(operated)}; "
        f"SIGTERM {stop_seconds:.1f} s, restart {restart_seconds:.1f} s "
        f"({restarted_mb:.0f} MB, scratch {restarted_scratch:.1f} MB after restart)"
    )
    fds, threads = [s.fds for s in run_.samples], [s.threads for s in run_.samples]
    scratch = [s.scratch_mb for s in run_.samples]
    print(
        f"fds {min(fds)}-{max(fds)}, threads {min(threads)}-{max(threads)}, "
        f"scratch {min(scratch):.1f}-{max(scratch):.1f} MB"
    )
    checks = check_outcomes(run_)
    checks += check_memory(run_, idle_mb, memory_limit_mb(provider))
    checks += check_audit(provider, run_.tally.outcomes, arrivals(server.log_path))
    # What each peer got, for a closer look at a failed check (kept with --workdir).
    with (work / "outcomes.jsonl").open("w") as sent:
        for outcome in run_.tally.outcomes:
            sent.write(json.dumps(dataclasses.asdict(outcome)) + "\n")
    return report(checks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=180, help="seconds of load")
    parser.add_argument(
        "--peers", type=lambda t: tuple(int(n) for n in t.split(",")), default=(8, 32)
    )
    parser.add_argument("--pause", type=float, default=0.25, help="mean seconds between requests")
    parser.add_argument("--warmup", type=float, default=30, help="seconds of the busy phase")
    parser.add_argument("--idle", type=float, default=30, help="seconds sampled after the load")
    parser.add_argument("--interval", type=float, default=10, help="seconds between samples")
    parser.add_argument("--resign-every", type=float, default=30)
    parser.add_argument("--hup-every", type=float, default=60)
    parser.add_argument(
        "--same-shape", action="store_true", help="re-sign without changing the row filter"
    )
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--only", type=lambda t: t.split(","), help="only these request kinds")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed")
    args = parser.parse_args()
    if args.only and set(args.only) - set(KINDS):
        parser.error(f"--only takes {', '.join(KINDS)}")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="connector-soak-"))
    if args.workdir and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.duration:.0f} s of load, peers {args.peers}, work folder {work}")
    try:
        passed = soak(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
