"""Replacing a file so that a reader sees either the old bytes or the new ones, never a part.

The new bytes go to a temporary file in the same folder (same file system, so the rename is
atomic), are flushed to disk, and the rename itself is made durable by syncing the folder.
Temporary names start with '.' and end with '.tmp', which no reader of policies picks up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace path with data in one rename, after the data is on disk."""
    fd, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX
    )
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # mkstemp makes 0600: others read policies
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    sync_directory(path.parent)


def move_durably(source: Path, target: Path) -> None:
    """Rename source to target (same file system) and make the rename durable."""
    os.replace(source, target)
    sync_directory(target.parent)
    if source.parent != target.parent:
        sync_directory(source.parent)


def sync_directory(directory: Path) -> None:
    """Flush a folder's entries (renames, new files) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
