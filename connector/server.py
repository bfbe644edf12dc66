"""Building and running the gRPC server: mutual TLS, limits, health, reflection, reloads, stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from connector._proto.connector.v1 import connector_pb2 as pb
from connector._proto.connector.v1 import connector_pb2_grpc as pb_grpc
from connector.audit import AuditLog
from connector.config import Settings, load_settings
from connector.errors import ConfigError, IdentityError
from connector.identity import load_ed25519_private, load_private_key
from connector.memory import QuietTrimmer
from connector.policy.engine import PolicyEngine, build_engine
from connector.policy.model import UsagePolicy
from connector.policy.registry import PolicyRegistry
from connector.policy.signing import trusted_keys
from connector.provider import Provider
from connector.quota import QuotaLedger
from connector.receipt import ReceiptSigner, endorse_receipt_key
from connector.sandbox import SandboxDatabase, SandboxLimits
from connector.service import ConnectorService
from connector.shaping import load_mask_key

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Connector"].full_name
STOP_GRACE_SECONDS = 10.0


def _tls_credentials(settings: Settings) -> grpc.ServerCredentials:
    """Server credentials that demand a client certificate chained to the CA bundle."""
    files = {}
    for what, path in (
        ("certificate", settings.cert),
        ("key", settings.key),
        ("CA bundle", settings.ca),
    ):
        try:
            files[what] = path.read_bytes()
        except OSError as exc:
            raise IdentityError(f"cannot read the TLS {what} {path}: {exc.strerror}") from None
    return grpc.ssl_server_credentials(
        [(files["key"], files["certificate"])],
        root_certificates=files["CA bundle"],
        require_client_auth=True,
    )


def _engine_factory(settings: Settings) -> Callable[[Sequence[UsagePolicy]], PolicyEngine]:
    def factory(policies: Sequence[UsagePolicy]) -> PolicyEngine:
        return build_engine(settings.policies.engine, policies, opa_url=settings.policies.opa_url)

    return factory


def build_provider(settings: Settings) -> Provider:
    """The Provider for a member's home: store opened, policies loaded, receipt key read."""
    sandbox = SandboxDatabase(
        settings.database,
        SandboxLimits(
            memory_limit=settings.server.memory_limit,
            threads=settings.server.threads,
            max_query_seconds=settings.server.max_query_seconds,
        ),
        settings.shaped_copies,
    )
    signers = trusted_keys(settings.policies.trusted_signers.values())
    log.info("trusted policy signers: %s", ", ".join(signers) or "none")
    registry = PolicyRegistry(settings.policies.directory, signers, _engine_factory(settings))
    receipt_key = load_ed25519_private(settings.receipt_key)
    tls_key = load_private_key(settings.key)
    if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{settings.key}: the TLS key must be EC P-256")
    signer = ReceiptSigner(
        receipt_key,
        endorsement=endorse_receipt_key(tls_key, settings.member_id, receipt_key.public_key()),
        certificate_pem=settings.cert.read_text(encoding="ascii"),
    )
    return Provider(
        settings.member_id,
        settings.dataspace,
        sandbox,
        registry,
        signer,
        audit=AuditLog(settings.audit_log, signer),
        quotas=QuotaLedger(settings.quota_ledger),
        revoked=settings.revoked,
        mask_key=load_mask_key(settings.mask_key),
        batch_rows=settings.server.batch_rows,
        max_query_seconds=settings.server.max_query_seconds,
        max_concurrent_queries=settings.server.max_concurrent_queries,
    )


@dataclass
class RunningServer:
    """A started server and what it needs to reload and stop cleanly."""

    server: grpc.Server
    port: int
    provider: Provider
    health: health.HealthServicer
    settings: Settings
    _stop: threading.Event
    _watcher: threading.Thread | None = None

    def reload(self) -> None:
        """Re-read the revocation list and re-verify every policy now."""
        try:
            self.provider.revoked = load_settings(self.settings.home).revoked
        except ConfigError as exc:
            log.error("connector.toml not reloaded, keeping the previous revocations: %s", exc)
        self.provider.policies.reload()

    def _watch(self) -> None:
        config = self.settings.home / "connector.toml"
        last = _mtime(config)
        trimmer = QuietTrimmer()
        while not self._stop.wait(self.settings.policies.reload_seconds):
            trimmer.observe(self.provider.audit.head[0])
            try:
                if _mtime(config) != last:
                    last = _mtime(config)
                    self.reload()
                else:
                    self.provider.policies.reload_if_changed()
            except Exception:
                # The watcher must outlive any single bad reload.
                log.exception("reload failed")

    def start_watching(self) -> None:
        """Reload policies and revocations when their files change (polling)."""
        self._watcher = threading.Thread(target=self._watch, name="policy-watch", daemon=True)
        self._watcher.start()

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop taking requests, let running ones finish within grace seconds, close the store."""
        self._stop.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.provider.sandbox.close()
        self.provider.audit.close()
        self.provider.quotas.close()


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def start_server(settings: Settings, listen: str | None = None) -> RunningServer:
    """Start the server for a member's home on listen (HOST:PORT; port 0 picks a free one)."""
    provider = build_provider(settings)
    options = [
        ("grpc.max_receive_message_length", settings.server.max_message_bytes),
        ("grpc.max_send_message_length", settings.server.max_message_bytes * 4),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.max_connection_idle_ms", 600_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    workers = settings.server.max_concurrent_queries + 4
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        options=options,
        maximum_concurrent_rpcs=workers * 4,
    )
    pb_grpc.add_ConnectorServicer_to_server(ConnectorService(provider), server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = listen or settings.server.listen
    try:
        port = server.add_secure_port(address, _tls_credentials(settings))
    except RuntimeError as exc:
        provider.sandbox.close()
        raise ConfigError(
            f"cannot listen on {address}: {exc}; is another server using it?"
        ) from None
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, port, provider, health_servicer, settings, threading.Event())
    running.start_watching()
    log.info("member %s serving on %s (port %d), mutual TLS", settings.member_id, address, port)
    return running


def serve_forever(settings: Settings, listen: str | None = None) -> None:
    """Run in the foreground until SIGTERM or SIGINT; SIGHUP reloads policies and revocations."""
    running = start_server(settings, listen)
    stop = threading.Event()

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("%s received, stopping", signal.Signals(signum).name)
        stop.set()

    def on_hup(_signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP received, reloading")
        threading.Thread(target=running.reload, name="sighup-reload", daemon=True).start()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        while not stop.wait(3600):
            pass
    finally:
        running.stop()
        log.info("stopped")
