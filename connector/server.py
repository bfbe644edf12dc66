"""Building and running the gRPC server: mutual TLS, limits, health, reflection, reloads, stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from connector.audit import AuditLog
from connector.config import Settings, load_settings
from connector.errors import ConfigError, ConnectorError, IdentityError
from connector.identity import load_ed25519_private, load_private_key
from connector.memory import QuietTrimmer
from connector.metrics import ConnectorMetrics
from connector.policy.fit import fit_warnings
from connector.policy.model import UsagePolicy
from connector.policy.opa import OpaLink, engine_factory, opa_link
from connector.policy.registry import PolicyRegistry, PolicySnapshot
from connector.policy.signing import trusted_keys
from connector.policy.versions import VersionMemory
from connector.process_memory import limit_address_space, prepare_allocators, process_allowance
from connector.provider import Provider
from connector.quota import QuotaLedger
from connector.receipt import ReceiptSigner, endorse_receipt_key
from connector.sandbox import SandboxDatabase, SandboxLimits
from connector.service import SERVICE_NAME as CONNECTOR_SERVICE
from connector.service import ConnectorService, add_to_server
from connector.shaping import load_mask_key
from connector.store import DatasetInfo
from connector.thread_pool import PrestartedThreadPool
from connector.tls_reload import ServerTlsFiles, TlsMaterial

log = logging.getLogger(__name__)

SERVICE_NAME = CONNECTOR_SERVICE
# After the grace period, stopped queries need a moment to notice the interrupt in DuckDB
# (about 3 s at worst) and write their audit entries.
DRAIN_SECONDS = 10.0
SETTLE_SECONDS = 1.0
HEALTH_SECONDS = 0.5  # how often an unwritable audit log is retried while NOT_SERVING


class ArrivalCounter(grpc.ServerInterceptor):  # type: ignore[misc]
    """Counts each connector request when it arrives, before it waits for a worker.

    Runs on gRPC's serving thread, so it does no I/O: the handler records the request.
    """

    def __init__(self, service: ConnectorService) -> None:
        self._service = service

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        """Count the arrival of a connector method; pass everything on unchanged."""
        handler = continuation(handler_call_details)
        method = getattr(handler_call_details, "method", "") or ""
        if handler is not None and method.startswith(f"/{SERVICE_NAME}/"):
            self._service.arrived()
        return handler


def _follow_tls(
    settings: Settings, signer: ReceiptSigner, metrics: ConnectorMetrics
) -> Callable[[TlsMaterial], None]:
    """Keep the receipt key's endorsement and the certificate peers check receipts against
    in step with the TLS files in force."""
    receipt_public = load_ed25519_private(settings.receipt_key).public_key()

    def follow(material: TlsMaterial) -> None:
        endorsement = endorse_receipt_key(material.key, settings.member_id, receipt_public)
        signer.endorsement = endorsement
        signer.certificate_pem = material.cert_pem.decode("ascii")
        metrics.tls_reloaded()

    return follow


def _log_misfits(policies: Sequence[UsagePolicy], datasets: Mapping[str, DatasetInfo]) -> None:
    """Say in the log why a policy in force grants nothing (a dataset or column typo...)."""
    for policy in policies:
        for warning in fit_warnings(policy, datasets):
            log.warning("policy %s@%d: %s", policy.id, policy.version, warning)


def _policies_loaded(
    snapshot: PolicySnapshot,
    sandbox: SandboxDatabase,
    also: Callable[[PolicySnapshot], None] | None,
) -> None:
    _log_misfits(snapshot.policies, sandbox.datasets())
    if also is not None:
        also(snapshot)


def build_provider(
    settings: Settings,
    opa: OpaLink | None = None,
    on_policy_load: Callable[[PolicySnapshot], None] | None = None,
) -> Provider:
    """The Provider for a member's home: store opened, policies loaded, receipt key read.

    opa: the link to the OPA server (engine `opa`; made here when not given);
    on_policy_load: also told of every policy load (metrics)."""
    if opa is None:
        opa = opa_link(settings)
    sandbox = SandboxDatabase(
        settings.database,
        SandboxLimits(
            memory_limit=settings.server.memory_limit,
            threads=settings.server.threads,
            max_query_seconds=settings.server.max_query_seconds,
        ),
        settings.shaped_copies,
    )
    sandbox.shaped.max_bytes = settings.shaped_copies_max_bytes
    signers = trusted_keys(settings.policies.trusted_signers.values())
    log.info("trusted policy signers: %s", ", ".join(signers) or "none")
    registry = PolicyRegistry(
        settings.policies.directory,
        signers,
        engine_factory(settings, opa),
        VersionMemory(settings.policies.versions_file),
        on_load=lambda snapshot: _policies_loaded(snapshot, sandbox, on_policy_load),
    )
    receipt_key = load_ed25519_private(settings.receipt_key)
    tls_key = load_private_key(settings.key)
    if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{settings.key}: the TLS key must be EC P-256")
    signer = ReceiptSigner(
        receipt_key,
        endorsement=endorse_receipt_key(tls_key, settings.member_id, receipt_key.public_key()),
        certificate_pem=settings.cert.read_text(encoding="ascii"),
    )
    provider = Provider(
        settings.member_id,
        settings.dataspace,
        sandbox,
        registry,
        signer,
        audit=AuditLog(
            settings.audit_log,
            signer,
            refusal_burst=settings.refusal_burst,
            refusals_per_second=settings.refusals_per_minute / 60,
        ),
        quotas=QuotaLedger(settings.quota_ledger),
        revoked=settings.revoked,
        mask_key=load_mask_key(settings.mask_key),
        batch_rows=settings.server.batch_rows,
        max_query_seconds=settings.server.max_query_seconds,
        max_concurrent_queries=settings.server.max_concurrent_queries,
        mask_consistency=settings.policies.mask_consistency,
        explains_per_minute=settings.server.explains_per_minute,
        max_concurrent_queries_per_member=settings.server.max_concurrent_queries_per_member,
        stall_seconds=settings.server.stall_seconds,
    )
    provider.slots.queue_length = settings.server.queue_length
    provider.slots.queue_seconds = settings.server.queue_seconds
    if opa is not None:
        # An OPA server that stops answering (or trusting this connector) stops answers at
        # once, as its operators expect: its decisions are not kept.
        provider.decisions.max_entries = 0
    return provider


@dataclass
class RunningServer:
    """A started server and what it needs to reload and stop cleanly."""

    server: grpc.Server
    port: int
    provider: Provider
    health: health.HealthServicer
    settings: Settings
    service: ConnectorService
    tls: ServerTlsFiles
    metrics: ConnectorMetrics
    _stop: threading.Event
    opa: OpaLink | None = None
    metrics_port: int = 0  # where /metrics is served (0: not served)
    _watcher: threading.Thread | None = None
    _health_keeper: threading.Thread | None = None
    _reload_asked: threading.Event = field(default_factory=threading.Event)

    def set_serving(self, serving: bool) -> None:
        """Tell the health service whether requests are answered now."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def refresh_health(self, _changed: bool = True) -> None:
        """SERVING while the audit log can be written and the OPA server (if any) answers."""
        self.set_serving(self.provider.audit.available and (self.opa is None or self.opa.available))

    def _keep_health(self) -> None:
        # Retries an unwritable audit log (it resumes by itself), writes due aggregates, and
        # checks the OPA server, pushing the policies again when it lost them (restarted).
        while not self._stop.wait(HEALTH_SECONDS):
            try:
                self.provider.audit.tick()
            except Exception:
                log.exception("audit upkeep failed")
            if self.opa is not None:
                try:
                    self.opa.probe()
                except Exception:
                    log.exception("checking the OPA server failed")

    def reload(self) -> None:
        """Re-read the TLS files and the revocation list, and re-verify every policy now."""
        self.tls.reload()
        try:
            self.provider.revoked = load_settings(self.settings.home).revoked
        except ConfigError as exc:
            log.error("connector.toml not reloaded, keeping the previous revocations: %s", exc)
        self.provider.policies.reload()
        self.provider.prune_shaped_copies()

    def ask_reload(self) -> None:
        """Have the watcher thread reload now (SIGHUP): starting a thread for it could fail
        once peers' queries hold the memory the server may map."""
        self._reload_asked.set()

    def _watch(self) -> None:
        config = self.settings.home / "connector.toml"
        last = _mtime(config)
        trimmer = QuietTrimmer()
        while True:
            asked = self._reload_asked.wait(self.settings.policies.reload_seconds)
            if self._stop.is_set():
                return
            self._reload_asked.clear()
            trimmer.observe(self.provider.audit.head[0])
            try:
                self.tls.reload_if_changed()
                if asked or _mtime(config) != last:
                    last = _mtime(config)
                    self.reload()
                elif self.provider.policies.reload_if_changed():
                    self.provider.prune_shaped_copies()
            except Exception:
                # The watcher must outlive any single bad reload.
                log.exception("reload failed")

    def start_watching(self) -> None:
        """Reload policies and revocations when their files change (polling)."""
        self._watcher = threading.Thread(target=self._watch, name="policy-watch", daemon=True)
        self._watcher.start()
        self._health_keeper = threading.Thread(
            target=self._keep_health, name="audit-upkeep", daemon=True
        )
        self._health_keeper.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop taking requests; let running queries finish for grace seconds (default:
        shutdown_grace_seconds), then stop them; write their audit entries and the
        shutdown checkpoint, and close the store."""
        if grace is None:
            grace = self.settings.server.shutdown_grace_seconds
        self._stop.set()
        self._reload_asked.set()  # wakes the watcher, which then ends
        self.health.enter_graceful_shutdown()
        # New calls are refused from now on; gRPC itself cancels what is left only after
        # our own stop below and the time the handlers need to write their entries.
        self.server.stop(grace + DRAIN_SECONDS)
        if not self.service.wait_until_idle(grace, queries_only=True):
            log.warning(
                "stopping %d queries still running after %g s (shutdown_grace_seconds)",
                self.service.stop_queries(),
                grace,
            )
        self.service.stop_queries()  # anything that slipped in between is refused too
        if not self.service.wait_until_idle(DRAIN_SECONDS):
            log.error("requests still in progress after %g s: stopping anyway", DRAIN_SECONDS)
        # The handlers are done; gRPC still sends their last status. Calls of no connector
        # request (health watches) are cut after that moment.
        self.server.stop(SETTLE_SECONDS).wait()
        self.provider.stall_watch.stop()
        self.provider.sandbox.close()
        self.provider.audit.close()
        self.provider.quotas.close()
        self.metrics.close()
        # Operators (and the soak) compare this with the audit log: every request that
        # reached the connector has an entry of its own or is counted in a "refusals" one.
        log.info(
            "stopped after %d connector requests since start; audit log closed at entry %d",
            self.service.arrivals,
            self.provider.audit.head[0],
        )


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _close_unstarted(provider: Provider) -> None:
    """Release what a server that could not start holds (nothing was answered yet)."""
    provider.sandbox.close()
    provider.audit.close()
    provider.quotas.close()


def start_server(settings: Settings, listen: str | None = None) -> RunningServer:
    """Start the server for a member's home on listen (HOST:PORT; port 0 picks a free one)."""
    opa = opa_link(settings)
    metrics = ConnectorMetrics()
    provider = build_provider(settings, opa, metrics.policies_loaded)
    provider.audit.on_written = metrics.audit_written
    metrics.follow(provider.slots.in_use, provider.quotas)
    options = [
        ("grpc.max_receive_message_length", settings.server.max_message_bytes),
        ("grpc.max_send_message_length", settings.server.max_message_bytes * 4),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.max_connection_idle_ms", 600_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    # Workers enough that a request rarely waits, queued queries included (each holds one);
    # requests beyond max_in_flight (counted from arrival) are refused by the handler, on
    # record, not by gRPC without a trace.
    max_in_flight = settings.server.max_concurrent_queries * 4 + 8 + settings.server.queue_length
    service = ConnectorService(
        provider,
        max_piece_bytes=settings.server.max_message_bytes * 4 - 1024,
        max_in_flight=max_in_flight,
    )
    server = grpc.server(
        PrestartedThreadPool(max_workers=max_in_flight + 8, thread_name_prefix="rpc"),
        interceptors=[ArrivalCounter(service)],
        options=options,
    )
    add_to_server(service, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = listen or settings.server.listen
    try:
        tls = ServerTlsFiles(
            settings.cert,
            settings.key,
            settings.ca,
            settings.member_id,
            on_change=_follow_tls(settings, provider.signer, metrics),
        )
        port = server.add_secure_port(address, tls.credentials())
        metrics_port = metrics.serve(settings.metrics.listen) if settings.metrics.listen else 0
    except ConnectorError:
        _close_unstarted(provider)
        raise
    except RuntimeError as exc:
        _close_unstarted(provider)
        raise ConfigError(
            f"cannot listen on {address}: {exc}; is another server using it?"
        ) from None
    server.start()
    provider.stall_watch.start()
    running = RunningServer(
        server,
        port,
        provider,
        health_servicer,
        settings,
        service,
        tls,
        metrics,
        threading.Event(),
        opa,
        metrics_port,
    )
    running.refresh_health()
    provider.audit.on_change = running.refresh_health
    if opa is not None:
        opa.on_change = running.refresh_health
    running.start_watching()
    log.info("member %s serving on %s (port %d), mutual TLS", settings.member_id, address, port)
    return running


def _limit_memory(settings: Settings) -> None:
    """The sandbox's own memory bound (process_memory.py): set once everything is loaded."""
    server = settings.server
    limit = limit_address_space(process_allowance(server.memory_limit, server.process_memory_limit))
    if limit is None:
        log.warning(
            "this platform cannot limit the server's address space: only DuckDB's memory_limit, "
            "which does not count strings that queries build, bounds a peer's query"
        )
        return
    log.info(
        "memory: the process may map %d MiB beyond the %d MiB it maps now (process_memory_limit)",
        limit.allowance >> 20,
        limit.mapped_at_start >> 20,
    )


def serve_forever(settings: Settings, listen: str | None = None) -> None:
    """Run in the foreground until SIGTERM or SIGINT; SIGHUP reloads policies and revocations."""
    prepare_allocators()
    running = start_server(settings, listen)
    _limit_memory(settings)
    stop = threading.Event()

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.info("%s received, already stopping", name)
            return
        log.info(
            "%s received, stopping: running queries may finish within %g s",
            name,
            settings.server.shutdown_grace_seconds,
        )
        stop.set()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP received, reloading")
        running.ask_reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        while not stop.wait(3600):
            pass
    finally:
        running.stop()
        log.info("stopped")
