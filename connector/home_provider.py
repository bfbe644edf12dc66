"""The Provider of a member's home as the server runs it: store opened read-write for live
ingest, policies loaded and checked against the data, receipt key endorsed by the TLS key."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric import ec

from connector.audit import AuditLog
from connector.config import Settings
from connector.errors import IdentityError
from connector.held_directory import HeldDirectory
from connector.identity import load_ed25519_private, load_private_key
from connector.policy.fit import fit_warnings
from connector.policy.model import UsagePolicy
from connector.policy.opa import OpaLink, engine_factory, opa_link
from connector.policy.registry import PolicyRegistry, PolicySnapshot
from connector.policy.signing import trusted_keys
from connector.policy.versions import VersionMemory
from connector.provider import Provider
from connector.quota import QuotaLedger
from connector.receipt import ReceiptEndorsement, ReceiptSigner, endorse_receipt_key
from connector.sandbox import SandboxDatabase, SandboxLimits
from connector.shaping import load_mask_key
from connector.store import DatasetInfo

log = logging.getLogger(__name__)


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
        writable=True,  # the server is the single writer of live ingests (ingest_service.py)
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
        roles=HeldDirectory(settings.home, settings.ca, settings.dataspace),
    )
    receipt_key = load_ed25519_private(settings.receipt_key)
    tls_key = load_private_key(settings.key)
    if not isinstance(tls_key, ec.EllipticCurvePrivateKey):
        raise IdentityError(f"{settings.key}: the TLS key must be EC P-256")
    signer = ReceiptSigner(
        receipt_key,
        ReceiptEndorsement(
            endorse_receipt_key(tls_key, settings.member_id, receipt_key.public_key()),
            settings.cert.read_text(encoding="ascii"),
        ),
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
