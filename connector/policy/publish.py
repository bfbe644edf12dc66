"""Publishing a new policy version in one step, without a moment where no version is in force.

The draft is kept outside the policies folder, signed, and moved in under its own name
(ID.vVERSION.yaml): the signature first (a signature alone is ignored by the reload), then
the policy, each by an atomic rename. The old version stays in its file until the new one
is in the folder, and the highest valid version wins, so every reload finds one complete,
signed version. Older versions are then moved to policies/superseded/ (policy file first,
so no reload sees it without its signature), or kept while the new one is not valid yet.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from connector.atomic_file import move_durably, write_atomically
from connector.errors import PolicyError
from connector.policy.model import MAX_POLICY_BYTES, UsagePolicy, parse_policy, read_limited
from connector.policy.signing import (
    PolicyVerdict,
    VerdictStatus,
    load_policy_dir,
    memory_refusal,
    signature_bytes,
    signature_path,
)
from connector.policy.versions import VersionRecord

SUPERSEDED_FOLDER = "superseded"


@dataclass(frozen=True)
class Published:
    """What a publish did: where the new version lives and what it replaced."""

    policy: UsagePolicy
    path: Path
    in_force_now: bool
    retired: tuple[Path, ...] = ()  # older versions moved to policies/superseded/
    kept: tuple[PolicyVerdict, ...] = ()  # older versions left in force until the new starts
    already_published: bool = False


def published_name(policy: UsagePolicy) -> str:
    """The file name a published version gets: its id and version."""
    return f"{policy.id}.v{policy.version}.yaml"


def publish_policy(
    draft: Path,
    directory: Path,
    key: ed25519.Ed25519PrivateKey,
    *,
    trusted: Mapping[str, ed25519.Ed25519PublicKey],
    remembered: Mapping[str, VersionRecord],
    now: dt.datetime,
) -> Published:
    """Sign draft and move it with its signature into directory; PolicyError says why not."""
    if draft.resolve().parent == directory.resolve():
        raise PolicyError(
            f"{draft} is inside the policies folder; keep drafts elsewhere (the connector reads "
            "every file in that folder) and publish them from there"
        )
    data = read_limited(draft, MAX_POLICY_BYTES)
    policy = parse_policy(draft, data)
    digest = hashlib.sha256(data).hexdigest()
    _check_dates(draft, policy, now)
    refusal = memory_refusal(policy, digest, remembered)
    if refusal is not None:
        raise PolicyError(f"{draft}: not published: {refusal[1]}")
    _, verdicts = load_policy_dir(directory, trusted, now, remembered)
    same = [v for v in verdicts if v.policy is not None and v.policy.id == policy.id]
    target = directory / published_name(policy)
    identical = _check_against_folder(draft, policy, digest, same, target)
    if identical is not None:
        return Published(policy, identical.path, _in_force(policy, now), already_published=True)
    write_atomically(signature_path(target), signature_bytes(data, key))
    write_atomically(target, data)
    older = [v for v in same if v.policy is not None and v.policy.version < policy.version]
    if not _in_force(policy, now):
        kept = tuple(v for v in older if v.status is VerdictStatus.VALID)
        return Published(policy, target, False, kept=kept)
    return Published(policy, target, True, retired=tuple(_retire(v.path) for v in older))


def _check_dates(draft: Path, policy: UsagePolicy, now: dt.datetime) -> None:
    if now >= policy.valid_until:
        raise PolicyError(
            f"{draft}: not published: version {policy.version} of {policy.id} expired on "
            f"{policy.valid_until.isoformat()}; set valid.until in the future"
        )


def _check_against_folder(
    draft: Path,
    policy: UsagePolicy,
    digest: str,
    same: list[PolicyVerdict],
    target: Path,
) -> PolicyVerdict | None:
    """The published file already holding exactly this version, if any; PolicyError when
    the folder holds a higher or a different same version, or target is another file."""
    for verdict in same:
        assert verdict.policy is not None
        published = verdict.policy.version
        if published > policy.version or (published == policy.version and verdict.sha256 != digest):
            raise PolicyError(
                f"{draft}: not published: {verdict.path.name} already holds version {published} "
                f"of {policy.id}; set `version: {published + 1}` and publish again"
            )
        if published == policy.version:
            return verdict
    if target.exists() or signature_path(target).exists():
        raise PolicyError(
            f"{draft}: not published: {target} already exists and is not this version of "
            f"{policy.id}; move it away first"
        )
    return None


def _in_force(policy: UsagePolicy, now: dt.datetime) -> bool:
    return policy.valid_from <= now < policy.valid_until


def _retire(path: Path) -> Path:
    """Move an older version and its signature to policies/superseded/, policy file first."""
    folder = path.parent / SUPERSEDED_FOLDER
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    counter = 1
    while target.exists() or signature_path(target).exists():
        target = folder / f"{path.stem}.{counter}{path.suffix}"
        counter += 1
    move_durably(path, target)
    if signature_path(path).exists():
        move_durably(signature_path(path), signature_path(target))
    return target
