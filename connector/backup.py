"""Backup of a member's home: a consistent copy in one archive, also while the server runs.

The archive (tar, gzip) holds `backup.json` first (format, member, time, and each file's
size and sha256), then every regular file of the home under its path in the home. Files a
running server writes are copied through a consistent path of their own:

- the DuckDB database: one read transaction on a read-only attach (`COPY FROM DATABASE`);
- the audit log: every whole line up to one moment (entries are appended whole and
  fsync'd), checked like `connector audit verify` before it is archived;
- the quota ledger: SQLite's online backup, taken after the audit log, so restored quotas
  never count fewer queries than the restored log shows answered.

Left out: the shaped copies (remade at start), write-ahead and journal files (the copies
above are complete without them), symbolic links, sockets and other special files.
Restoring is `restore.py`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import shutil
import sqlite3
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import duckdb

from connector.atomic_file import TEMPORARY_SUFFIX, sync_directory
from connector.audit_chain import verify_log
from connector.config import Settings
from connector.errors import BackupError, StoreBusy
from connector.identity import load_ed25519_public, public_path
from connector.ingest_client import server_snapshot
from connector.safetext import escaped
from connector.sqltext import quote_identifier, sql_string
from connector.store import busy_or_error

MANIFEST = "backup.json"
MAX_NAME_CHARS = 1024
BACKUP_FORMAT = 1
CHUNK = 1024 * 1024
Snapshot = Callable[[Path, Path], None] | None
_SIDE_FILES = (".wal", "-wal", "-shm", "-journal")  # write-ahead and journal files


@dataclass(frozen=True)
class BackupSummary:
    """What a backup holds."""

    path: Path
    files: int
    bytes: int
    audit_entries: int


def make_backup(settings: Settings, output: Path, snapshot: Snapshot = None) -> BackupSummary:
    """Write a consistent archive of settings.home to output (mode 0600: it holds keys).

    snapshot(source, target) copies the DuckDB file consistently (default: by the running
    server, which holds its writer, else from a read-only attach, `snapshot_database`).
    """
    home = settings.home.resolve()
    output = output.resolve()
    if output.exists():
        raise BackupError(f"{output} exists already; choose a new file name")
    if output.is_relative_to(home):
        raise BackupError(f"{output} is inside the home it backs up; write it elsewhere")
    check_inside_home(settings, home)
    try:
        staging = Path(tempfile.mkdtemp(prefix=".connector-backup-", dir=output.parent))
    except OSError as exc:
        raise BackupError(f"cannot write in {output.parent}: {exc.strerror}") from None
    try:
        audit_entries = _stage(settings, home, staging, snapshot or _home_snapshot(settings))
        files = _manifest_files(staging)
        manifest = {
            "format": BACKUP_FORMAT,
            "member_id": settings.member_id,
            "dataspace": settings.dataspace,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "audit_entries": audit_entries,
            "files": files,
        }
        _write_archive(staging, manifest, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(int(f["size"]) for f in files.values())
    return BackupSummary(output, len(files), size, audit_entries)


def _configured_paths(settings: Settings) -> dict[str, Path]:
    paths = {
        "[tls] cert": settings.cert,
        "[tls] key": settings.key,
        "[tls] ca": settings.ca,
        "[store] path": settings.database,
        "[store] quota_ledger": settings.quota_ledger,
        "[store] shaped_copies": settings.shaped_copies,
        "[policies] dir": settings.policies.directory,
        "[signing] policy_key": settings.policy_signing_key,
        "[signing] receipt_key": settings.receipt_key,
        "[signing] mask_key": settings.mask_key,
        "[audit] path": settings.audit_log,
    }
    paths.update(
        {f"[policies.trusted_signers] {n}": p for n, p in settings.policies.trusted_signers.items()}
    )
    optional = {
        "[policies] versions_file": settings.policies.versions_file,
        "[policies] opa_token_file": settings.policies.opa_token_file,
        "[policies] opa_ca": settings.policies.opa_ca,
    }
    paths.update({k: p for k, p in optional.items() if p is not None})
    return paths


def check_inside_home(settings: Settings, home: Path) -> None:
    """A backup is the home folder: every file connector.toml names must be inside it
    (BackupError names the first that is not)."""
    for key, path in _configured_paths(settings).items():
        if not path.resolve().is_relative_to(home):
            raise BackupError(
                f"{key} is {path}, outside the home {home}: a backup copies the home folder "
                "only; move the file into the home (and connector.toml with it) first"
            )


def _stage(
    settings: Settings, home: Path, staging: Path, snapshot: Callable[[Path, Path], None]
) -> int:
    """Copy the home into staging, each live file consistently; returns the audit entries."""
    database, ledger = settings.database.resolve(), settings.quota_ledger.resolve()
    audit, shaped = settings.audit_log.resolve(), settings.shaped_copies.resolve()
    special = {database, ledger, audit}
    skipped = {shaped, *(Path(f"{p}{s}") for p in (database, ledger, shaped) for s in _SIDE_FILES)}
    for path in _regular_files(home):
        # Files written atomically are renamed into place: a half-written one is not kept.
        if path in special or path in skipped or path.name.endswith(TEMPORARY_SUFFIX):
            continue
        name = path.relative_to(home).as_posix()
        if not is_plain_archive_name(name):
            raise BackupError(
                f"'{escaped(name)}' in the home has a name a restore refuses (the archive's "
                f"{MANIFEST}, a backslash or a control character): rename or remove it, then "
                "back up again; nothing was written"
            )
        _copy_plain(path, staging / path.relative_to(home))
    entries = 0
    if audit.exists():  # no request answered yet: no log
        entries = _copy_audit_log(settings, audit, staging / audit.relative_to(home))
    if ledger.exists():
        _copy_sqlite(ledger, staging / ledger.relative_to(home))
    snapshot(database, staging / database.relative_to(home))
    return entries


def is_plain_archive_name(name: object) -> bool:
    """A plain relative path with no way out of the home: the only names a backup writes
    and a restore takes."""
    text = name if isinstance(name, str) else ""
    parts = text.split("/")
    return (
        0 < len(text) <= MAX_NAME_CHARS
        and text != MANIFEST
        and not text.startswith("/")
        and "\\" not in text
        and all(part not in ("", ".", "..") for part in parts)
        and all(ch.isprintable() for ch in text)
        and PurePosixPath(text).as_posix() == text
    )


def _regular_files(home: Path) -> Iterator[Path]:
    """Every regular file under home; links, sockets and the like are not followed or kept."""
    for folder, dirs, names in os.walk(home, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            path = Path(folder) / name
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(os.lstat(path).st_mode):
                    yield path


def new_private_file(path: Path) -> IO[bytes]:
    """Create path (mode 0600, its folders 0700) for writing; never follows or replaces."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    return os.fdopen(fd, "wb")


def _copy_plain(source: Path, target: Path) -> None:
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return  # removed since the folder was listed (a policy withdrawn, say)
    except OSError as exc:
        raise BackupError(f"cannot read {source}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as src, new_private_file(target) as out:
        shutil.copyfileobj(src, out, CHUNK)


def _copy_audit_log(settings: Settings, source: Path, target: Path) -> int:
    """The log's whole lines as they are now, checked before they count as backed up."""
    with source.open("rb") as log_file:
        data = log_file.read()
    whole = data[: data.rfind(b"\n") + 1]  # a line being appended is left for the next backup
    with new_private_file(target) as out:
        out.write(whole)
    verdict = verify_log(target, load_ed25519_public(public_path(settings.receipt_key)))
    if not verdict.intact:
        raise BackupError(
            f"the audit log {source} does not verify ({verdict.message}); nothing was backed "
            "up: run `connector audit verify` and keep the log as it is for investigation"
        )
    return verdict.entries


def _copy_sqlite(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with (
            contextlib.closing(sqlite3.connect(source)) as src,
            contextlib.closing(sqlite3.connect(target)) as out,
        ):
            src.backup(out)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot copy the quota ledger {source}: {exc}") from None
    os.chmod(target, 0o600)


def copy_attached_database(con: duckdb.DuckDBPyConnection, catalog: str, target: Path) -> None:
    """Copy the database attached to con as catalog, as one transaction sees it, into the
    new file target: also usable on a connection that writes (the server's, if it owns
    the writer)."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    con.execute(f"ATTACH {sql_string(str(target))} AS backup_copy")
    try:
        con.execute(f"COPY FROM DATABASE {quote_identifier(catalog)} TO backup_copy")
    finally:
        con.execute("DETACH backup_copy")
    os.chmod(target, 0o600)


def _home_snapshot(settings: Settings) -> Callable[[Path, Path], None]:
    def snapshot(source: Path, target: Path) -> None:
        if not server_snapshot(settings, target):  # no server runs on this home
            snapshot_database(source, target)

    return snapshot


def copy_database_files(database: Path, target: Path) -> None:
    """Copy the DuckDB file and its write-ahead log, if any, to target and target.wal;
    consistent only while no commit can land (the server's `CommitGate.hold`)."""
    for source, copy in ((database, target), (Path(f"{database}.wal"), Path(f"{target}.wal"))):
        if source.exists():
            with open(source, "rb") as src, new_private_file(copy) as out:
                shutil.copyfileobj(src, out, CHUNK)
                out.flush()
                os.fsync(out.fileno())


def snapshot_database(source: Path, target: Path) -> None:
    """A copy of the DuckDB file as of one moment, read while a server may hold it."""
    con = duckdb.connect(":memory:")
    try:
        try:
            con.execute(f"ATTACH {sql_string(str(source))} AS backup_source (READ_ONLY)")
        except duckdb.Error as exc:
            busy = busy_or_error(exc, source)
            if isinstance(busy, StoreBusy):
                raise BackupError(
                    f"{source} is held for writing by another process, so no consistent copy "
                    "can be read now; retry when that process (an ingest) has ended"
                ) from None
            raise busy from None
        copy_attached_database(con, "backup_source", target)
    except duckdb.Error as exc:
        raise BackupError(f"cannot copy the database {source}: {exc}") from None
    finally:
        con.close()


def _manifest_files(staging: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in _regular_files(staging):
        digest = hashlib.sha256()
        with path.open("rb") as data:
            for chunk in iter(lambda: data.read(CHUNK), b""):
                digest.update(chunk)
        name = path.relative_to(staging).as_posix()
        files[name] = {"size": path.stat().st_size, "sha256": digest.hexdigest()}
    return files


def _write_archive(staging: Path, manifest: dict[str, Any], output: Path) -> None:
    partial = output.with_name(f".{output.name}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            body = json.dumps(manifest, indent=1, sort_keys=True).encode()
            tar.addfile(_info(MANIFEST, len(body)), fileobj=io.BytesIO(body))
            for name, described in manifest["files"].items():
                with (staging / name).open("rb") as data:
                    tar.addfile(_info(name, int(described["size"])), fileobj=data)
        with open(partial, "rb+") as done:
            os.fsync(done.fileno())
        os.replace(partial, output)
        sync_directory(output.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o600, int(dt.datetime.now(dt.UTC).timestamp())
    return info
