"""Restoring a home from a `connector backup` archive, which is hostile input here.

Only regular files whose names are plain relative paths listed in the manifest, with the
size and sha256 it lists, are written; nothing lands outside the new home, no link, folder
entry or device is taken from the archive, and the result must read as a home whose audit
log verifies before it is put in place (unpacked beside it, then renamed in one step).
A restore never writes over a home: the target must be new or an empty folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connector.atomic_file import sync_directory
from connector.audit_chain import verify_log
from connector.backup import (
    BACKUP_FORMAT,
    CHUNK,
    MANIFEST,
    check_inside_home,
    is_plain_archive_name,
    new_private_file,
)
from connector.config import CONFIG_FILE, Settings, load_settings
from connector.errors import BackupError, ConfigError, ConnectorError
from connector.identity import load_ed25519_public, public_path

MAX_FILES = 100_000
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class RestoreSummary:
    """What a restore recreated."""

    home: Path
    member_id: str
    files: int
    audit_message: str


def restore_backup(archive: Path, home: Path) -> RestoreSummary:
    """Recreate a home from archive in home, which must not exist or be empty."""
    home = home.resolve()
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise BackupError(
            f"{home} is not an empty folder: restore makes a new home and never writes over "
            "one; choose a new folder"
        )
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{home.name}.restore-", dir=home.parent))
    except OSError as exc:
        raise BackupError(f"cannot write in {home.parent}: {exc.strerror}") from None
    try:
        manifest = _unpack(archive, staging)
        settings, message = _check_restored(staging, manifest)
        if home.exists():
            home.rmdir()
        os.rename(staging, home)
        sync_directory(home.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RestoreSummary(home, settings.member_id, len(manifest["files"]), message)


def _unpack(archive: Path, staging: Path) -> dict[str, Any]:
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            first = tar.next()
            if first is None or first.name != MANIFEST or not first.isfile():
                raise BackupError(
                    f"{archive} is not a connector backup: it does not start with {MANIFEST}"
                )
            if first.size > MAX_MANIFEST_BYTES:
                raise BackupError(f"{archive}: {MANIFEST} is too large ({first.size} bytes)")
            manifest = _read_manifest(archive, _read_member(tar, first, first.size))
            _check_space(staging, manifest)
            unpacking = _Unpacking(archive, tar, manifest["files"], staging)
            while (member := tar.next()) is not None:
                _unpack_member(unpacking, member)
            missing = sorted(set(manifest["files"]) - unpacking.seen)
            if missing:
                raise BackupError(f"{archive} is incomplete: {', '.join(missing[:5])} missing")
            return manifest
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"cannot read the backup {archive}: {exc}") from None


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    source = tar.extractfile(member)
    if source is None:
        raise BackupError(f"{member.name!r} in the archive is not a file")
    return source.read(limit + 1)[:limit]


def _read_manifest(archive: Path, body: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BackupError(f"{archive}: {MANIFEST} is not JSON") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), int):
        raise BackupError(f"{archive}: {MANIFEST} has no format number")
    if manifest["format"] > BACKUP_FORMAT:
        raise BackupError(
            f"{archive} has backup format {manifest['format']}, written by a newer connector "
            f"(this one reads format {BACKUP_FORMAT}); restore it with that version"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or len(files) > MAX_FILES:
        raise BackupError(f"{archive}: {MANIFEST} lists no files, or too many")
    for name, described in files.items():
        _check_name(archive, name)
        if not (
            isinstance(described, dict)
            and isinstance(described.get("size"), int)
            and described["size"] >= 0
            and isinstance(described.get("sha256"), str)
            and len(described["sha256"]) == 64
        ):
            raise BackupError(f"{archive}: {MANIFEST} describes {name!r} without size and sha256")
    if CONFIG_FILE not in files:
        raise BackupError(f"{archive} holds no {CONFIG_FILE}: not a member's home")
    return manifest


def _check_name(archive: Path, name: object) -> None:
    """A file name in the archive must be a plain relative path with no way out of the home."""
    if not is_plain_archive_name(name):
        raise BackupError(
            f"{archive} names a file {str(name)[:80]!r} outside a plain relative path; refused"
        )


def _check_space(staging: Path, manifest: dict[str, Any]) -> None:
    needed = sum(int(f["size"]) for f in manifest["files"].values())
    free = shutil.disk_usage(staging).free
    if needed > free:
        raise BackupError(
            f"the backup needs {needed >> 20} MiB and {staging.parent} has {free >> 20} MiB free"
        )


@dataclass
class _Unpacking:
    """One archive being unpacked into staging: the files its manifest lists, those seen."""

    archive: Path
    tar: tarfile.TarFile
    files: dict[str, Any]
    staging: Path
    seen: set[str] = field(default_factory=set)


def _unpack_member(unpacking: _Unpacking, member: tarfile.TarInfo) -> None:
    archive, files, seen = unpacking.archive, unpacking.files, unpacking.seen
    name = member.name
    if not member.isfile():
        raise BackupError(
            f"{archive} holds {name[:80]!r}, which is not a regular file (a link, folder or "
            "device); refused"
        )
    if name not in files or name in seen:
        raise BackupError(
            f"{archive} holds {name[:80]!r}, which its manifest does not list once; refused"
        )
    expected = files[name]
    if member.size != expected["size"]:
        raise BackupError(
            f"{archive}: {name} is {member.size} bytes, its manifest says {expected['size']}"
        )
    seen.add(name)
    source = unpacking.tar.extractfile(member)
    if source is None:
        raise BackupError(f"{archive}: {name} cannot be read")
    digest, written = hashlib.sha256(), 0
    target = unpacking.staging.joinpath(*name.split("/"))
    with new_private_file(target) as out:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            written += len(chunk)
            if written > expected["size"]:
                raise BackupError(f"{archive}: {name} is longer than its manifest says")
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != expected["sha256"]:
        raise BackupError(
            f"{archive}: {name} does not match its sha256 in the manifest (damaged or changed)"
        )


def _check_restored(staging: Path, manifest: dict[str, Any]) -> tuple[Settings, str]:
    """The restored home reads as one and its audit log verifies."""
    try:
        settings = load_settings(staging)
        check_inside_home(settings, staging.resolve())
    except (ConfigError, BackupError) as exc:
        raise BackupError(f"the restored connector.toml is not usable: {exc}") from None
    try:
        key = load_ed25519_public(public_path(settings.receipt_key))
    except ConnectorError as exc:
        raise BackupError(
            f"the restored home has no receipt key to check its audit log: {exc}"
        ) from None
    verdict = verify_log(settings.audit_log, key)
    if not verdict.intact:
        raise BackupError(f"the restored audit log does not verify: {verdict.message}")
    if verdict.entries != manifest.get("audit_entries", verdict.entries):
        raise BackupError(
            f"the restored audit log has {verdict.entries} entries, the manifest says "
            f"{manifest.get('audit_entries')}"
        )
    return settings, verdict.message
