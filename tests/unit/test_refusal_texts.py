"""Storage failures are named for the owner; the peer gets a fixed reason (issue 16.6)."""

from __future__ import annotations

import errno
import sqlite3

import pytest

from connector.peer_failures import storage_trouble


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
        (OSError(errno.EFBIG, "File too large"), "the file-size limit is reached"),
        (sqlite3.OperationalError("database or disk is full"), "disk is full"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "readonly database"),
    ],
)
def test_a_full_or_read_only_volume_is_named(error: BaseException, cause: str) -> None:
    assert storage_trouble(error) == cause


def test_other_errors_are_not_storage_trouble() -> None:
    assert storage_trouble(ValueError("bad")) is None
    assert storage_trouble(OSError(errno.ECONNREFUSED, "refused")) is None
