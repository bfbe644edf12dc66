"""Prometheus metrics of one server, in a registry of its own (never the process-global one).

Request counts, durations, rows and bytes are taken from the audit entries as they are
written (`AuditLog.on_written`), so the metrics say what the audit log says: every request
entry is counted once under its kind and outcome, and refusals the log throttled are counted
from its aggregate entries. Gauges (active queries, policies in force, quota use today) are
read when Prometheus scrapes. Served over plain HTTP at `[metrics] listen`, `/metrics`.

Live ingests report through `ingest_reported` (the server's `LiveIngest`), watched files among them.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from connector.errors import AlreadyLoaded, ConfigError, ConnectorError
from connector.policy.registry import PolicySnapshot
from connector.policy.signing import VerdictStatus
from connector.quota import QuotaLedger
from connector.store_ingest import LoadRequest

log = logging.getLogger(__name__)

PREFIX = "connector"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
INGEST_OUTCOMES = ("loaded", "failed")
WATCHED_OUTCOMES = ("loaded", "failed", "duplicate")


class _QuotaUse(Collector):
    """Today's quota use per member and policy, read from the ledger at each scrape."""

    def __init__(self, ledger: QuotaLedger) -> None:
        self._ledger = ledger

    def collect(self) -> Iterator[Metric]:
        families = {
            what: GaugeMetricFamily(
                f"{PREFIX}_quota_{what}_today",
                f"{what.capitalize()} counted today (UTC) against the quotas of each policy",
                labels=["member", "policy"],
            )
            for what in ("queries", "rows", "bytes")
        }
        try:
            usage = self._ledger.usage_today(dt.datetime.now(dt.UTC))
        except Exception:  # closed while stopping, or unreadable: no sample, no failed scrape
            log.debug("quota use not read for metrics", exc_info=True)
            usage = []
        for member, policy, used in usage:
            families["queries"].add_metric([member, policy], used.queries)
            families["rows"].add_metric([member, policy], used.rows)
            families["bytes"].add_metric([member, policy], used.bytes)
        yield from families.values()


class ConnectorMetrics:
    """The metrics of one running server; updates are cheap and never raise to the caller."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Peer requests ended, by kind (catalog, explain, query) and outcome, as recorded "
            "one by one in the audit log",
            ["kind", "outcome"],
            registry=reg,
        )
        self.throttled_refusals = Counter(
            f"{PREFIX}_throttled_refusals",
            "Refusals counted in the audit log's aggregate entries instead of one by one",
            ["outcome"],
            registry=reg,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "How long requests took, from arrival to their audit entry",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self.rows_sent = Counter(f"{PREFIX}_rows_sent", "Result rows sent to peers", registry=reg)
        self.bytes_sent = Counter(
            f"{PREFIX}_bytes_sent", "Result bytes (Arrow IPC) sent to peers", registry=reg
        )
        self.audit_entries = Counter(
            f"{PREFIX}_audit_entries",
            "Audit log entries written since start, by type",
            ["type"],
            registry=reg,
        )
        self.audit_last_seq = Gauge(
            f"{PREFIX}_audit_last_seq", "Sequence number of the last audit entry", registry=reg
        )
        self.checkpoint_seq = Gauge(
            f"{PREFIX}_audit_last_checkpoint_seq",
            "Sequence number of the last signed checkpoint written since start",
            registry=reg,
        )
        self.checkpoint_time = Gauge(
            f"{PREFIX}_audit_last_checkpoint_timestamp_seconds",
            "When the last signed checkpoint was written (Unix time)",
            registry=reg,
        )
        self.policy_reloads = Counter(
            f"{PREFIX}_policy_reloads", "Loads of the policies folder since start", registry=reg
        )
        self.policies_in_force = Gauge(
            f"{PREFIX}_policies_in_force", "Valid, signed policies in force", registry=reg
        )
        self.policy_files_skipped = Gauge(
            f"{PREFIX}_policy_files_skipped",
            "Policy files not in force at the last load, by reason",
            ["reason"],
            registry=reg,
        )
        self.tls_reloads = Counter(
            f"{PREFIX}_tls_reloads", "New TLS files put in force since start", registry=reg
        )
        self.active_queries = Gauge(
            f"{PREFIX}_active_queries", "Queries admitted and not yet ended", registry=reg
        )
        self.ingests = Counter(
            f"{PREFIX}_ingests",
            "Ingests into a dataset while serving, by dataset, mode and outcome",
            ["dataset", "mode", "outcome"],
            registry=reg,
        )
        self.ingested_rows = Counter(
            f"{PREFIX}_ingested_rows", "Rows loaded by ingests while serving", ["dataset"],
            registry=reg,
        )  # fmt: skip
        self.watched_files = Counter(
            f"{PREFIX}_watched_files",
            "Files taken from a watched drop folder, by outcome (loaded, failed, duplicate)",
            ["outcome"],
            registry=reg,
        )
        self._lock = threading.Lock()
        self._http: WSGIServer | None = None

    # -- what the server reports --------------------------------------------------------

    def audit_written(self, entry: Mapping[str, Any]) -> None:
        """One audit entry is on disk (AuditLog.on_written)."""
        kind = str(entry.get("type", ""))
        self.audit_entries.labels(kind).inc()
        self.audit_last_seq.set(int(entry.get("seq", 0)))
        if kind == "request":
            request_kind = str(entry.get("kind", "")) or "unknown"
            self.requests.labels(request_kind, str(entry.get("outcome", "")) or "unknown").inc()
            self.duration.labels(request_kind).observe(float(entry.get("duration_ms", 0)) / 1000)
            self.rows_sent.inc(max(0, int(entry.get("rows", 0))))
            self.bytes_sent.inc(max(0, int(entry.get("bytes", 0))))
        elif kind == "refusals":
            for outcome, count in dict(entry.get("outcomes", {})).items():
                self.throttled_refusals.labels(str(outcome)).inc(int(count))
        elif kind == "checkpoint":
            self.checkpoint_seq.set(int(entry.get("seq", 0)))
            moment = dt.datetime.fromisoformat(str(entry.get("time")))
            self.checkpoint_time.set(moment.timestamp())

    def policies_loaded(self, snapshot: PolicySnapshot) -> None:
        """The policies folder was (re)loaded."""
        self.policy_reloads.inc()
        self.policies_in_force.set(len(snapshot.policies))
        skipped: dict[str, int] = dict.fromkeys(
            (s.name.lower() for s in VerdictStatus if s is not VerdictStatus.VALID), 0
        )
        for verdict in snapshot.verdicts:
            if verdict.status is not VerdictStatus.VALID:
                skipped[verdict.status.name.lower()] += 1
        for reason, count in skipped.items():
            self.policy_files_skipped.labels(reason).set(count)

    def tls_reloaded(self, _material: object = None) -> None:
        """New TLS files are in force."""
        self.tls_reloads.inc()

    def ingest_finished(self, dataset: str, mode: str, rows: int, *, ok: bool) -> None:
        """An ingest while serving ended (mode: replace or append; rows: rows it loaded)."""
        self.ingests.labels(dataset, mode, "loaded" if ok else "failed").inc()
        if ok:
            self.ingested_rows.labels(dataset).inc(max(0, rows))

    def ingest_reported(
        self, request: LoadRequest, rows: int, error: ConnectorError | None
    ) -> None:
        """A live ingest ended (`LiveIngest`'s report); a request that loads a file only once
        comes from a watched folder (`connector ingest --watch`)."""
        self.ingest_finished(request.dataset, request.mode, rows, ok=error is None)
        if request.once:
            duplicate = isinstance(error, AlreadyLoaded)
            self.watched_file("loaded" if error is None else "duplicate" if duplicate else "failed")

    def watched_file(self, outcome: str) -> None:
        """A file was taken from a watched folder: loaded, failed or duplicate."""
        if outcome not in WATCHED_OUTCOMES:
            raise ValueError(f"outcome must be one of {WATCHED_OUTCOMES}, not {outcome!r}")
        self.watched_files.labels(outcome).inc()

    def follow(self, active_queries: Callable[[], int], quotas: QuotaLedger) -> None:
        """Read active queries and today's quota use from the server at each scrape."""
        self.active_queries.set_function(lambda: float(active_queries()))
        self.registry.register(_QuotaUse(quotas))

    # -- the endpoint ---------------------------------------------------------------------

    def serve(self, listen: str) -> int:
        """Serve /metrics on listen (HOST:PORT, port 0 picks one); returns the port."""
        host, _, port = listen.rpartition(":")
        try:
            server, _thread = start_http_server(
                int(port), addr=host.strip("[]"), registry=self.registry
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {listen} ([metrics] listen): {exc.strerror}"
            ) from None
        with self._lock:
            self._http = server
        bound = int(server.server_address[1])
        log.info("metrics at http://%s:%d/metrics", host, bound)
        return bound

    def close(self) -> None:
        """Stop serving /metrics."""
        with self._lock:
            server, self._http = self._http, None
        if server is not None:
            server.shutdown()
            server.server_close()
