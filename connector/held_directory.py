"""What a member's home holds of the directory: the latest one it accepted (the published
bytes and their signature in one file, HOME/member-directory.json, so an update is one
atomic write), verified again on every read; taking a newer published one."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from connector import jws
from connector.atomic_file import write_atomically
from connector.directory import (
    MAX_DIRECTORY_BYTES,
    Directory,
    parse_directory,
    signature_path,
    verify_directory,
)
from connector.errors import DirectoryError

log = logging.getLogger(__name__)

HELD_FILE = "member-directory.json"  # the directory a member's home holds


def held_path(home: Path) -> Path:
    """Where a home keeps the directory it accepted."""
    return home / HELD_FILE


def _read_bounded(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise DirectoryError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        raise DirectoryError(f"{path} is larger than {limit} bytes")
    return data


def read_published(path: Path, ca_pem: bytes, dataspace: str) -> tuple[Directory, bytes, str]:
    """A published directory FILE (with FILE.jws beside it), verified; with its bytes and
    signature."""
    data = _read_bounded(path, MAX_DIRECTORY_BYTES)
    sig_path = signature_path(path)
    if not sig_path.exists():
        raise DirectoryError(
            f"{path} is not signed: {sig_path.name} is missing beside it (the authority's "
            "`connector dataspace publish` writes both)"
        )
    signature = _read_bounded(sig_path, 4096).decode("ascii", errors="replace")
    return verify_directory(data, signature, ca_pem, dataspace), data, signature


def load_held(home: Path, ca_pem: bytes, dataspace: str) -> Directory | None:
    """The directory the home holds, verified again (None when it holds none)."""
    path = held_path(home)
    if not path.exists():
        return None
    data, signature = _held_document(path)
    return verify_directory(data, signature, ca_pem, dataspace)


def _held_document(path: Path) -> tuple[bytes, str]:
    """The held file's directory bytes and signature, not yet verified."""
    try:
        raw = jws.parse_json(_read_bounded(path, 2 * MAX_DIRECTORY_BYTES + 8192))
    except jws.JwsError as exc:
        raise DirectoryError(f"{path} is not a held member directory: {exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("directory"), str):
        raise DirectoryError(f"{path} is not a held member directory")
    return raw["directory"].encode(), str(raw.get("signature", ""))


def held_or_none(home: Path, ca_pem: bytes, dataspace: str) -> Directory | None:
    """load_held, but a broken held file counts as none (logged): roles then grant nobody."""
    try:
        return load_held(home, ca_pem, dataspace)
    except (DirectoryError, jws.JwsError) as exc:
        log.error("the member directory this home holds is not usable, ignored: %s", exc)
        return None


@dataclass(frozen=True)
class Update:
    """What `directory update` did: the directory now held, and the version held before."""

    directory: Directory
    previous_version: int | None
    changed: bool


def _held_floor(
    home: Path, ca_pem: bytes, dataspace: str, source: Path
) -> tuple[Directory | None, bool]:
    """The held directory an update must not go below, and whether it verifies. One that
    no longer does (CA rotated, file damaged) still sets that floor: otherwise an older
    directory signed by the same authority could bring back a role it had withdrawn."""
    try:
        return load_held(home, ca_pem, dataspace), True
    except (DirectoryError, jws.JwsError) as exc:
        path = held_path(home)
        try:
            unverified = parse_directory(_held_document(path)[0])
        except (DirectoryError, jws.JwsError):
            raise DirectoryError(
                f"the directory this home holds ({path}) cannot be read ({exc}), so the "
                f"version {source} must not go below is unknown; nothing was changed: move "
                f"that file away to take {source} whatever its version"
            ) from None
        log.warning(
            "the directory this home holds no longer verifies (%s); its version %d is still "
            "the lowest an update may take",
            exc,
            unverified.version,
        )
        return unverified, False


def update_held(home: Path, source: Path, ca_pem: bytes, dataspace: str) -> Update:
    """Hold the published directory at source, if it verifies and is not older than the one
    held; the one held stays in force on any refusal."""
    directory, data, signature = read_published(source, ca_pem, dataspace)
    held, verified = _held_floor(home, ca_pem, dataspace, source)
    if held is not None:
        if directory.version < held.version:
            standing = (
                f"version {held.version} stays in force"
                if verified
                else f"version {held.version} no longer verifies, so roles grant nobody until "
                "one as new is taken"
            )
            raise DirectoryError(
                f"{source} is version {directory.version}, older than version {held.version} "
                f"held; {standing} (ask the authority for the latest directory)"
            )
        if directory.version == held.version:
            if directory.to_json() != held.to_json():
                raise DirectoryError(
                    f"{source} is version {directory.version}, the version held, with other "
                    "content; version "
                    f"{held.version} stays in force (the authority must publish a new version)"
                )
            if verified:
                return Update(held, held.version, False)
    document = {
        "directory": data.decode("utf-8"),
        "signature": signature.strip(),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_atomically(held_path(home), (json.dumps(document) + "\n").encode())
    return Update(directory, held.version if held else None, True)


def directory_fingerprint(home: Path) -> tuple[int, int] | None:
    """Size and modification time of the held directory (None when there is none)."""
    try:
        stat = held_path(home).stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


class HeldDirectory:
    """The directory a home holds, read again (and verified) whenever the file changes:
    what the server resolves role grants through."""

    def __init__(self, home: Path, ca_file: Path, dataspace: str) -> None:
        self._home = home
        self._ca_file = ca_file
        self._dataspace = dataspace

    def fingerprint(self) -> tuple[int, int] | None:
        """Changes whenever the held directory is replaced."""
        return directory_fingerprint(self._home)

    def current(self) -> Directory | None:
        """The held directory, verified; None when none is held or it does not verify."""
        try:
            ca_pem = self._ca_file.read_bytes()
        except OSError as exc:
            log.error("cannot read the CA bundle %s: %s", self._ca_file, exc.strerror)
            return None
        return held_or_none(self._home, ca_pem, self._dataspace)
