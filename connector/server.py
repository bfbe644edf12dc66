"""Building and running the servers of a home: gRPC with mutual TLS, limits, health and
reflection, the Flight SQL port, the ingest socket and metrics; reloads and a clean stop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from connector.config import Settings, load_settings
from connector.errors import ConfigError, ConnectorError
from connector.home_provider import build_provider
from connector.identity import load_ed25519_private
from connector.ingest_client import socket_path
from connector.ingest_service import IngestSocket, LiveIngest
from connector.memory import QuietTrimmer
from connector.metrics import ConnectorMetrics
from connector.policy.opa import OpaLink, opa_link
from connector.provider import Provider
from connector.receipt import ReceiptEndorsement, ReceiptSigner, endorse_receipt_key
from connector.service import SERVICE_NAME as CONNECTOR_SERVICE
from connector.service import ConnectorService, add_to_server
from connector.thread_pool import PrestartedThreadPool
from connector.tls_reload import ServerTlsFiles, TlsMaterial

if TYPE_CHECKING:
    from connector.flight import FlightEndpoint

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
        signer.endorsement = ReceiptEndorsement(endorsement, material.cert_pem.decode("ascii"))
        metrics.tls_reloaded()

    return follow


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
    flight: FlightEndpoint | None = None  # the Arrow Flight SQL port ([flight] listen)
    flight_held = False  # stop() left a Flight call that pyarrow cannot cancel
    ingest: IngestSocket | None = None

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
        if self._stop.is_set():
            return  # stopped already (a test's fixture may stop what the test stopped)
        if grace is None:
            grace = self.settings.server.shutdown_grace_seconds
        self._stop.set()
        self._reload_asked.set()  # wakes the watcher, which then ends
        self.health.enter_graceful_shutdown()
        # New calls are refused from now on; gRPC itself cancels what is left only after
        # our own stop below and the time the handlers need to write their entries.
        until = time.monotonic() + grace
        self.server.stop(grace + DRAIN_SECONDS)
        if self.flight is not None and not self.flight.stop(grace):
            self.flight_held = True
        if not self.service.wait_until_idle(max(0.0, until - time.monotonic()), queries_only=True):
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
        if self.ingest is not None:
            self.ingest.stop()
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


def _grpc_server(
    settings: Settings, provider: Provider
) -> tuple[ConnectorService, grpc.Server, health.HealthServicer]:
    """The gRPC server (not started) with the connector, health and reflection services."""
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
    return service, server, health_servicer


def start_server(
    settings: Settings, listen: str | None = None, flight_listen: str | None = None
) -> RunningServer:
    """Start the server for a member's home on listen (HOST:PORT; port 0 picks a free one),
    and Flight SQL on flight_listen (default [flight] listen; "" for none)."""
    opa = opa_link(settings)
    metrics = ConnectorMetrics()
    provider = build_provider(settings, opa, metrics.policies_loaded)
    provider.audit.on_written = metrics.audit_written
    metrics.follow(provider.slots.in_use, provider.quotas)
    service, server, health_servicer = _grpc_server(settings, provider)
    address = listen or settings.server.listen
    try:
        tls = ServerTlsFiles(
            settings.cert,
            settings.key,
            settings.ca,
            member_id=settings.member_id,
            dataspace=settings.dataspace,
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
    ingest = IngestSocket(
        LiveIngest(provider.sandbox, metrics.ingest_reported), socket_path(settings)
    )
    try:
        ingest.start()
    except (OSError, ConnectorError) as exc:
        server.stop(0).wait()
        metrics.close()
        _close_unstarted(provider)
        raise ConfigError(f"cannot open the ingest socket {ingest.path}: {exc}") from None
    server.start()
    try:
        flight = _start_flight(settings, provider, flight_listen)
    except Exception:
        ingest.stop()
        server.stop(0).wait()
        metrics.close()
        _close_unstarted(provider)
        raise
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
    running.flight = flight
    running.ingest = ingest
    running.refresh_health()
    provider.audit.on_change = running.refresh_health
    if opa is not None:
        opa.on_change = running.refresh_health
    running.start_watching()
    log.info("member %s serving on %s (port %d), mutual TLS", settings.member_id, address, port)
    return running


def _start_flight(
    settings: Settings, provider: Provider, listen: str | None
) -> FlightEndpoint | None:
    """The Flight SQL endpoint beside the gRPC server, or None when it is off."""
    address = settings.flight.listen if listen is None else listen
    if not address:
        return None
    # Loaded only here: pyarrow.flight and the Flight SQL modules cost about 0.08 s of CPU
    # at every start of a server that does not serve them.
    from connector.flight import start_flight

    return start_flight(provider, address, settings.cert, settings.key, settings.ca)
