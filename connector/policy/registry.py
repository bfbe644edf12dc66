"""The policies in force: loaded from the policies folder, verified, swapped in atomically.

A reload builds a complete new engine first and swaps one reference; requests already
running keep the engine they started with, so no query is dropped or sees half a load.
Versions only go up: each version put in force is recorded (policy/versions.py) before the
swap, and a lower or reused version is refused from then on, also after a restart.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ed25519

from connector.directory import Directory, members_with_roles
from connector.errors import ConnectorError
from connector.policy.consistency import MaskConflict, mask_conflicts
from connector.policy.engine import CatalogGrant, Decision, DecisionRequest, PolicyEngine
from connector.policy.model import UsagePolicy
from connector.policy.ref import PolicyRef, joined
from connector.policy.signing import (
    SIGNATURE_SUFFIX,
    PolicyVerdict,
    VerdictStatus,
    load_policy_dir,
)
from connector.policy.versions import InForce, VersionMemory

log = logging.getLogger(__name__)

RETRY_FAILED_SECONDS = 30  # not every poll: a lasting fault would fill the log
# A load that saw the folder change under it (a publish renaming files in) is done again;
# a few times, then the last one counts: it is still a correct verdict on what it read.
MAX_SETTLE_ATTEMPTS = 5
_REFUSED_ON_PURPOSE = (VerdictStatus.ROLLED_BACK, VerdictStatus.VERSION_REUSED)
EngineFactory = Callable[[Sequence[UsagePolicy]], PolicyEngine]


class RoleSource(Protocol):
    """Where role grants are resolved: the member directory the home holds."""

    def fingerprint(self) -> object: ...

    def current(self) -> Directory | None: ...


def with_role_members(policy: UsagePolicy, directory: Directory | None) -> UsagePolicy:
    """The policy with the members holding its roles added to its members (none without a
    directory: a role grant fails closed)."""
    if not policy.roles:
        return policy
    added = tuple(m for m in members_with_roles(directory, policy.roles) if m not in policy.members)
    if not added and directory is None:
        log.warning(
            "policy %s grants roles %s, but this home holds no usable member directory: the "
            "roles grant nobody (take one with `connector directory update`)",
            policy.id,
            ", ".join(policy.roles),
        )
    return replace(policy, members=policy.members + added)


@dataclass(frozen=True)
class PolicySnapshot:
    """One complete load: the engine built from the valid policies and every file's verdict."""

    engine: PolicyEngine
    policies: tuple[UsagePolicy, ...]
    verdicts: tuple[PolicyVerdict, ...]
    loaded_at: dt.datetime

    @functools.cached_property
    def by_id(self) -> Mapping[str, UsagePolicy]:
        """The policies in force by id."""
        return {p.id: p for p in self.policies}

    @functools.cached_property
    def mask_conflicts(self) -> tuple[MaskConflict, ...]:
        """Columns masked for a member by one policy in force and clear by another."""
        return mask_conflicts(self.policies)


def _folder_fingerprint(directory: Path) -> tuple[tuple[str, int, int], ...]:
    """Names, sizes and modification times of the policy and signature files."""
    if not directory.is_dir():
        return ()
    entries = []
    for path in sorted(directory.iterdir()):
        if path.suffix in (".yaml", ".yml") or path.name.endswith(SIGNATURE_SUFFIX):
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((path.name, stat.st_size, stat.st_mtime_ns))
    return tuple(entries)


def _next_date_change(verdicts: Sequence[PolicyVerdict]) -> dt.datetime | None:
    """The next moment a verdict changes by the clock alone: a pending policy comes into force
    or a policy in force expires. Polling reloads then, not on every tick (which rebuilt the
    engine and logged every skipped file every few seconds while any policy was pending)."""
    moments = [
        v.policy.valid_from if v.status is VerdictStatus.NOT_YET_VALID else v.policy.valid_until
        for v in verdicts
        if v.policy is not None and v.status in (VerdictStatus.NOT_YET_VALID, VerdictStatus.VALID)
    ]
    return min(moments, default=None)


class DenyingEngine:
    """The engine in force after a failed load: refuses everything and says why."""

    REASON = (
        "no policy is in force: the owner's policy files could not be loaded; "
        "ask the owner to check the connector's log"
    )

    def decide(self, request: DecisionRequest) -> Decision:
        """Always a refusal; peers are not told the owner's file names or errors."""
        return Decision(False, (self.REASON,))

    def catalog(self, member: str, time: dt.datetime) -> tuple[CatalogGrant, ...]:
        """Nothing is offered."""
        return ()


class PolicyRegistry:
    """Holds the current PolicySnapshot and reloads it when the folder changes."""

    def __init__(
        self,
        directory: Path,
        trusted_signers: Mapping[str, ed25519.Ed25519PublicKey],
        engine_factory: EngineFactory,
        versions: VersionMemory | None = None,
        on_load: Callable[[PolicySnapshot], None] | None = None,
        *,
        roles: RoleSource | None = None,
    ) -> None:
        """versions: where the versions in force are remembered (default: this process only);
        on_load: told of every snapshot put in force (e.g. to log what cannot work);
        roles: the member directory role grants are resolved through (none: they grant nobody)."""
        self._roles = roles
        self._roles_mark: object = None
        self._on_load = on_load
        self._directory = directory
        self._trusted = dict(trusted_signers)
        self._engine_factory = engine_factory
        self._versions = versions or VersionMemory(None)
        self._lock = threading.Lock()
        self._fingerprint: tuple[tuple[str, int, int], ...] = ()
        self._snapshot = self._load_or_deny()
        self._announce(self._snapshot)

    @property
    def snapshot(self) -> PolicySnapshot:
        """The policies in force now."""
        return self._snapshot

    def reload(self) -> PolicySnapshot:
        """Verify every file again, build a new engine and swap it in; log each skipped file."""
        with self._lock:
            self._snapshot = self._load_or_deny()
            self._announce(self._snapshot)
            return self._snapshot

    def _announce(self, snapshot: PolicySnapshot) -> None:
        if self._on_load is None:
            return
        try:
            self._on_load(snapshot)
        except Exception:
            log.exception("a listener of policy loads failed (the policies are in force)")

    def reload_if_changed(self) -> bool:
        """Reload when a file was added, changed or removed, or a policy came due or expired,
        and retry a failed load every RETRY_FAILED_SECONDS (an OPA server back up)."""
        now = dt.datetime.now(dt.UTC)
        due = _next_date_change(self._snapshot.verdicts)
        came_due = due is not None and now >= due
        retry = isinstance(self._snapshot.engine, DenyingEngine) and (
            now - self._snapshot.loaded_at
        ) >= dt.timedelta(seconds=RETRY_FAILED_SECONDS)
        unchanged = _folder_fingerprint(self._directory) == self._fingerprint and (
            self._roles is None or self._roles.fingerprint() == self._roles_mark
        )
        if unchanged and not (came_due or retry):
            return False
        self.reload()
        return True

    def _load_or_deny(self) -> PolicySnapshot:
        """A complete load, or on any failure a snapshot with no policy in force that says why.

        Any exception, not only the connector's own: keeping the old policies could keep a
        grant that was just withdrawn (a RecursionError from a hostile signature file did).
        """
        try:
            return self._load()
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ConnectorError) else type(exc).__name__
            log.error(
                "loading policies from %s failed, denying everything until fixed: %s",
                self._directory,
                reason,
                exc_info=not isinstance(exc, ConnectorError),
            )
            failed = PolicyVerdict(
                self._directory,
                VerdictStatus.MALFORMED,
                f"loading the policies failed ({reason}); no policy is in force until fixed",
            )
            # Not the factory: it may be what failed (an OPA server out of reach).
            return PolicySnapshot(DenyingEngine(), (), (failed,), dt.datetime.now(dt.UTC))

    def _load(self) -> PolicySnapshot:
        now, policies, verdicts = self._read_settled()
        directory = None
        if self._roles is not None:
            self._roles_mark = self._roles.fingerprint()
            directory = self._roles.current()
        policies = [with_role_members(p, directory) for p in policies]
        engine = self._engine_factory(policies)
        _log_verdicts(verdicts, policies)
        in_force = [
            InForce(v.policy.id, v.policy.version, v.sha256)
            for v in verdicts
            if v.status is VerdictStatus.VALID and v.policy is not None
        ]
        # Recorded before the swap: a version in force is never forgotten, even by a crash.
        for item in self._versions.record(in_force):
            log.info(
                "policy %s is in force at version %d; lower versions are refused from now on",
                item.policy_id,
                item.version,
            )
        log.info(
            "policies loaded from %s: %d in force (%s), %d skipped",
            self._directory,
            len(policies),
            joined(PolicyRef(p.id, p.version) for p in policies) or "none",
            len(verdicts) - len(policies),
        )
        snapshot = PolicySnapshot(engine, tuple(policies), tuple(verdicts), now)
        for conflict in snapshot.mask_conflicts:
            log.warning("policies in force disagree on a mask: %s", conflict.describe())
        return snapshot

    def _read_settled(self) -> tuple[dt.datetime, list[UsagePolicy], list[PolicyVerdict]]:
        """Verdicts on the folder, read again while its files changed during the reading.

        Files renamed in between the listing and the reading of a policy and its signature
        would otherwise give a torn verdict (gone, unsigned) and withdraw a grant until the
        next poll.
        """
        remembered = self._versions.records
        for _ in range(MAX_SETTLE_ATTEMPTS):
            before = _folder_fingerprint(self._directory)
            now = dt.datetime.now(dt.UTC)
            policies, verdicts = load_policy_dir(self._directory, self._trusted, now, remembered)
            self._fingerprint = _folder_fingerprint(self._directory)
            if self._fingerprint == before:
                break
        return now, policies, verdicts


def _log_verdicts(verdicts: Sequence[PolicyVerdict], policies: Sequence[UsagePolicy]) -> None:
    """One line per file not in force; for a pending version, what is in force until then."""
    in_force = {p.id: p for p in policies}
    for verdict in verdicts:
        if verdict.status is VerdictStatus.VALID:
            continue
        if verdict.status is VerdictStatus.NOT_YET_VALID and verdict.policy is not None:
            pending, current = verdict.policy, in_force.get(verdict.policy.id)
            until_then = (
                f"version {current.version} stays in force until then"
                if current is not None
                else f"until then no version of {pending.id} is in force"
            )
            log.warning(
                "policy %s (%s): version %d is valid only from %s; %s",
                pending.id,
                verdict.path.name,
                pending.version,
                pending.valid_from.isoformat(),
                until_then,
            )
        elif verdict.status in _REFUSED_ON_PURPOSE:
            log.error("policy %s refused: %s", verdict.path.name, verdict.message)
        else:
            log.warning("policy %s skipped: %s", verdict.path.name, verdict.message)
