"""The owner's offline tools (`policy test`, `policy replay`) decide with the server's own
Provider, built here over the home's data read-only, writing only into a scratch folder.

Nothing of the home is written or read beyond its data file and settings: the receipt and
mask keys are throwaway ones (a decision and an answer's columns do not depend on them), the
audit log and quota ledger live in the scratch folder, shaped copies in memory. Unsigned
drafts are copied into the scratch folder and signed there with a throwaway key, so that the
server's own loader judges them (validity, one version per id, duplicates) as it will once
they are signed.
"""

from __future__ import annotations

import bisect
import datetime as dt
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from connector import jws
from connector.audit import AuditLog
from connector.config import Settings
from connector.errors import ConfigError, PolicyError, StoreBusy
from connector.ingest_client import home_datasets
from connector.policy.model import MAX_POLICY_BYTES, parse_policy, read_limited
from connector.policy.registry import EngineFactory, PolicyRegistry, PolicySnapshot
from connector.policy.signing import load_policy_dir, policy_files, sign_policy
from connector.policy.versions import VersionRecord
from connector.provider import Provider
from connector.quota import QuotaLedger
from connector.receipt import ReceiptSigner
from connector.sandbox import SandboxDatabase, SandboxLimits
from connector.store import empty_copy

TrustedKeys = dict[str, ed25519.Ed25519PublicKey]


class PolicyTimeline:
    """A policy folder judged as of any moment, as the server would have loaded it then;
    loaded once for each span of time in which no policy begins or ends."""

    def __init__(
        self,
        directory: Path,
        trusted: Mapping[str, ed25519.Ed25519PublicKey],
        engine: EngineFactory,
        remembered: Mapping[str, VersionRecord] | None = None,
    ) -> None:
        self._directory = directory
        self._trusted = dict(trusted)
        self._engine = engine
        self._remembered = dict(remembered or {})
        moments: set[dt.datetime] = set()
        for path in policy_files(directory):
            try:
                policy = parse_policy(path)
            except PolicyError:
                continue  # never in force; its verdict says why
            moments.update((policy.valid_from, policy.valid_until))
        self._moments = sorted(moments)
        self._loaded: dict[tuple[int, bool], PolicySnapshot] = {}

    def at(self, moment: dt.datetime, *, remembered: bool = False) -> PolicySnapshot:
        """The policies in force at moment; remembered: refuse versions older than those
        the server has had in force (what it does today, not at another time)."""
        key = (bisect.bisect_right(self._moments, moment), remembered)
        if key not in self._loaded:
            memory = self._remembered if remembered else {}
            policies, verdicts = load_policy_dir(self._directory, self._trusted, moment, memory)
            self._loaded[key] = PolicySnapshot(
                self._engine(policies), tuple(policies), tuple(verdicts), moment
            )
        return self._loaded[key]


class FixedPolicies(PolicyRegistry):
    """A registry holding the snapshot it is given: no folder is read, watched or
    remembered (the offline tools choose the policies of each decision themselves)."""

    def __init__(self, snapshot: PolicySnapshot) -> None:
        # Deliberately not the registry's constructor: it loads a folder as of now.
        self._snapshot = snapshot

    def hold(self, snapshot: PolicySnapshot) -> None:
        """Put snapshot in force for the next decisions."""
        self._snapshot = snapshot


def offline_provider(settings: Settings, scratch: Path, policies: FixedPolicies) -> Provider:
    """A Provider over the home's data (read-only) that writes only into scratch; while the
    home's server runs (it holds the file), over empty tables of the same datasets."""
    server = settings.server
    limits = SandboxLimits(
        memory_limit=server.memory_limit,
        threads=server.threads,
        max_query_seconds=server.max_query_seconds,
    )
    try:
        sandbox = SandboxDatabase(settings.database, limits)  # shaped copies in memory
    except StoreBusy:
        sandbox = SandboxDatabase(empty_copy(home_datasets(settings), scratch), limits)
    sandbox.shaped.max_bytes = settings.shaped_copies_max_bytes
    signer = ReceiptSigner(ed25519.Ed25519PrivateKey.generate())  # nothing is sent
    try:
        return Provider(
            settings.member_id,
            settings.dataspace,
            sandbox,
            policies,
            signer,
            audit=AuditLog(scratch / "audit.jsonl", signer),
            quotas=QuotaLedger(scratch / "quotas.sqlite"),
            revoked=settings.revoked,
            mask_key=secrets.token_bytes(32),
            batch_rows=server.batch_rows,
            max_query_seconds=server.max_query_seconds,
            max_concurrent_queries=server.max_concurrent_queries,
            mask_consistency=settings.policies.mask_consistency,
        )
    except BaseException:
        sandbox.close()
        raise


def close_offline(provider: Provider) -> None:
    """Close what offline_provider opened (the scratch folder is the caller's)."""
    provider.sandbox.close()
    provider.audit.close()
    provider.quotas.close()


def signed_drafts(drafts: Path, scratch: Path) -> tuple[Path, TrustedKeys]:
    """The drafts checked, copied into scratch and signed with a throwaway key; the copy's
    folder and that key as the one trusted.

    Raises PolicyError (the draft's own file, line and fix) for a draft that does not parse.
    """
    if not drafts.is_dir():
        raise ConfigError(f"{drafts} is not a folder; give --policies the folder of draft policies")
    files = policy_files(drafts)
    if not files:
        raise ConfigError(f"no policy files (*.yaml, *.yml) in {drafts}")
    folder = scratch / "drafts"
    folder.mkdir()
    key = ed25519.Ed25519PrivateKey.generate()
    for path in files:
        data = read_limited(path, MAX_POLICY_BYTES)
        parse_policy(path, data)  # the draft's own name and line in any error
        copy = folder / path.name
        copy.write_bytes(data)
        sign_policy(copy, key)
    return folder, {jws.key_id(key.public_key()): key.public_key()}
