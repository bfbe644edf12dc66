"""Sign and verify policy files: a detached JWS (EdDSA / Ed25519) next to each file.

The signature covers the file's exact bytes and is checked before anything in the file is
trusted. `verify_policy` gives one verdict per file, with what to do about it.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from connector import jws
from connector.atomic_file import write_atomically
from connector.errors import PolicyError
from connector.identity import load_ed25519_public
from connector.policy.model import MAX_POLICY_BYTES, UsagePolicy, parse_policy, read_limited
from connector.policy.ref import PolicyRef
from connector.policy.versions import VersionRecord

log = logging.getLogger(__name__)

SIGNATURE_SUFFIX = ".jws"
MAX_SIGNATURE_BYTES = 16 * 1024
POLICY_SUFFIXES = (".yaml", ".yml")


class VerdictStatus(enum.Enum):
    """Why a policy file is, or is not, in force."""

    VALID = "valid"
    UNSIGNED = "unsigned"
    MODIFIED = "changed after signing"
    UNKNOWN_SIGNER = "unknown signer"
    MALFORMED = "malformed"
    EXPIRED = "expired"
    NOT_YET_VALID = "not yet valid"
    DUPLICATE = "duplicate id"
    SUPERSEDED = "superseded"
    ROLLED_BACK = "rolled back"
    VERSION_REUSED = "version reused"


@dataclass(frozen=True)
class PolicyVerdict:
    """The verdict on one policy file; policy is set when the file parsed and verified.

    sha256 is the digest of the bytes the signature was checked over (set with policy).
    """

    path: Path
    status: VerdictStatus
    message: str
    policy: UsagePolicy | None = None
    sha256: str = ""


def trusted_keys(public_key_files: Iterable[Path]) -> dict[str, ed25519.Ed25519PublicKey]:
    """The trusted signers' Ed25519 public keys by key id (the kid of their signatures)."""
    keys = {}
    for path in public_key_files:
        key = load_ed25519_public(path)
        keys[jws.key_id(key)] = key
    return keys


def signature_path(path: Path) -> Path:
    """Where a policy's detached signature lives: FILE.jws beside it."""
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def sign_policy(path: Path, private_key: ed25519.Ed25519PrivateKey) -> Path:
    """Check the policy parses, then write its detached signature; returns the signature path."""
    data = _read(path)
    parse_policy(path, data)
    target = signature_path(path)
    # Atomically: a reload must never read half a signature (it withdrew the grant).
    write_atomically(target, signature_bytes(data, private_key))
    return target


def signature_bytes(data: bytes, private_key: ed25519.Ed25519PrivateKey) -> bytes:
    """The content of a policy's .jws file: a detached JWS over data and a newline."""
    return (jws.sign(data, private_key, detached=True) + "\n").encode("ascii")


def _read(path: Path) -> bytes:
    return read_limited(path, MAX_POLICY_BYTES)


def verify_policy(
    path: Path, trusted: Mapping[str, ed25519.Ed25519PublicKey], now: dt.datetime
) -> PolicyVerdict:
    """Verdict on one file: signature first (over the exact bytes), then content, then dates.

    Never raises: whatever goes wrong with one file, that file is not in force and says why.
    """
    try:
        return _verify(path, trusted, now)
    except Exception as exc:
        # A reader bug must cost the file, not keep old policies in force or crash `verify`.
        log.exception("checking policy %s failed unexpectedly", path)
        return PolicyVerdict(
            path,
            VerdictStatus.MALFORMED,
            f"could not be checked ({type(exc).__name__}); it is not in force. "
            "Check the file and its signature, and report this",
        )


def _verify(
    path: Path, trusted: Mapping[str, ed25519.Ed25519PublicKey], now: dt.datetime
) -> PolicyVerdict:
    try:
        data = _read(path)
    except PolicyError as exc:
        return PolicyVerdict(path, VerdictStatus.MALFORMED, str(exc))
    sig_path = signature_path(path)
    if not sig_path.exists():
        return PolicyVerdict(
            path,
            VerdictStatus.UNSIGNED,
            f"no signature {sig_path.name}; have it signed with `connector policy sign`",
        )
    try:
        token = read_limited(sig_path, MAX_SIGNATURE_BYTES).decode("ascii", errors="replace")
        kid = jws.read_header(token.strip())["kid"]
    except PolicyError as exc:
        return PolicyVerdict(path, VerdictStatus.MALFORMED, f"signature {exc}")
    except jws.JwsError as exc:
        return PolicyVerdict(
            path, VerdictStatus.MALFORMED, f"signature {sig_path.name} is malformed: {exc}"
        )
    key = trusted.get(kid)
    if key is None:
        return PolicyVerdict(
            path,
            VerdictStatus.UNKNOWN_SIGNER,
            f"signed by key {kid}, which is not among this connector's trusted signers "
            "([policies.trusted_signers] in connector.toml)",
        )
    try:
        jws.verify(token, key, detached_payload=data)
    except jws.JwsError as exc:
        status = (
            VerdictStatus.MODIFIED
            if isinstance(exc, jws.SignatureMismatch)
            else VerdictStatus.MALFORMED
        )
        return PolicyVerdict(
            path,
            status,
            f"the file was changed after it was signed ({exc}); review it and sign it again"
            if status is VerdictStatus.MODIFIED
            else f"signature {sig_path.name} is malformed: {exc}",
        )
    try:
        policy = parse_policy(path, data)
    except PolicyError as exc:
        return PolicyVerdict(path, VerdictStatus.MALFORMED, str(exc))
    return replace(_dated_verdict(path, policy, now), sha256=hashlib.sha256(data).hexdigest())


def _dated_verdict(path: Path, policy: UsagePolicy, now: dt.datetime) -> PolicyVerdict:
    name = str(PolicyRef(policy.id, policy.version))
    if now >= policy.valid_until:
        return PolicyVerdict(
            path,
            VerdictStatus.EXPIRED,
            f"{name} expired on {policy.valid_until.isoformat()}",
            policy,
        )
    if now < policy.valid_from:
        return PolicyVerdict(
            path,
            VerdictStatus.NOT_YET_VALID,
            f"{name} is valid only from {policy.valid_from.isoformat()}",
            policy,
        )
    return PolicyVerdict(
        path,
        VerdictStatus.VALID,
        f"{name}, signed by a trusted key, valid until {policy.valid_until.isoformat()}",
        policy,
    )


def policy_files(directory: Path) -> list[Path]:
    """The policy files (*.yaml, *.yml) of a folder, sorted by name."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in POLICY_SUFFIXES and p.is_file())


def against_memory(
    verdict: PolicyVerdict, remembered: Mapping[str, VersionRecord]
) -> PolicyVerdict:
    """The verdict, refused when an equal or higher version of its policy was already in force.

    Only files that could come into force are judged (valid or not yet valid); an expired
    or broken file keeps its own verdict.
    """
    policy = verdict.policy
    if policy is None or verdict.status not in (VerdictStatus.VALID, VerdictStatus.NOT_YET_VALID):
        return verdict
    refusal = memory_refusal(policy, verdict.sha256, remembered)
    if refusal is None:
        return verdict
    return replace(verdict, status=refusal[0], message=refusal[1])


def memory_refusal(
    policy: UsagePolicy, sha256: str, remembered: Mapping[str, VersionRecord]
) -> tuple[VerdictStatus, str] | None:
    """Why this version may never come into force given the versions already in force, if so."""
    known = remembered.get(policy.id)
    if known is None or policy.version > known.version:
        return None
    if policy.version < known.version:
        return VerdictStatus.ROLLED_BACK, (
            f"rolled back: version {policy.version} is older than version {known.version} "
            f"already in force (policy {policy.id}); an old version never comes back: "
            f"to change the terms, publish a version above {known.version}"
        )
    if sha256 != known.sha256:
        return VerdictStatus.VERSION_REUSED, (
            f"version {policy.version} of policy {policy.id} was already in force with "
            f"other content; a changed policy needs a new version: set `version: "
            f"{known.version + 1}` and sign it again"
        )
    return None


def _one_per_id(verdicts: Sequence[PolicyVerdict]) -> list[PolicyVerdict]:
    """At most one valid file per policy id: the highest version.

    A lower version beside a higher one is superseded (that is how a new version replaces
    the old one without a gap); two valid files with the same highest version are both
    refused: which one legal meant is not for the connector to guess.
    """
    by_id: dict[str, list[PolicyVerdict]] = {}
    for verdict in verdicts:
        if verdict.status is VerdictStatus.VALID and verdict.policy is not None:
            by_id.setdefault(verdict.policy.id, []).append(verdict)
    return [_judged(verdict, by_id) for verdict in verdicts]


def _judged(verdict: PolicyVerdict, by_id: Mapping[str, list[PolicyVerdict]]) -> PolicyVerdict:
    policy = verdict.policy
    same = by_id.get(policy.id, []) if policy is not None else []
    if verdict.status is not VerdictStatus.VALID or policy is None or len(same) < 2:
        return verdict
    top = max(v.policy.version for v in same if v.policy is not None)
    highest = [v for v in same if v.policy is not None and v.policy.version == top]
    if policy.version < top:
        where = ", ".join(v.path.name for v in highest)
        return replace(
            verdict,
            status=VerdictStatus.SUPERSEDED,
            message=(
                f"{PolicyRef(policy.id, policy.version)} is superseded by version {top} "
                f"({where}); this file can be removed"
            ),
        )
    if len(highest) < 2:
        return verdict
    others = ", ".join(v.path.name for v in highest if v is not verdict)
    return replace(
        verdict,
        status=VerdictStatus.DUPLICATE,
        message=(
            f"policy id {policy.id} version {top} is also in {others}; keep one file per "
            "version, or give each policy its own id"
        ),
    )


def load_policy_dir(
    directory: Path,
    trusted: Mapping[str, ed25519.Ed25519PublicKey],
    now: dt.datetime,
    remembered: Mapping[str, VersionRecord] | None = None,
) -> tuple[list[UsagePolicy], list[PolicyVerdict]]:
    """The policies in force and a verdict for every file.

    remembered: the versions already in force before (a lower or reused one is refused).
    """
    verdicts = [verify_policy(path, trusted, now) for path in policy_files(directory)]
    # Superseded first: an old file beside its successor is a leftover, not a rollback.
    final = [against_memory(v, remembered or {}) for v in _one_per_id(verdicts)]
    policies = [v.policy for v in final if v.status is VerdictStatus.VALID and v.policy]
    return policies, final
