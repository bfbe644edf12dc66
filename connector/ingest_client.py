"""`connector ingest` from the owner's side: hand the file to the running server, or load it
into the database file directly when no server runs.

While a server runs it holds the member's DuckDB file and is its only writer (DuckDB allows
one writing process); the CLI then sends the request over the server's ingest socket, a
Unix socket in a folder only the owner's OS user can enter (ingest_service.py). Without a
server, the CLI opens the file itself, as before.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from connector.config import Settings
from connector.errors import (
    AlreadyLoaded,
    BackupError,
    ConnectorError,
    DataError,
    LoadedNotRead,
    StoreBusy,
    StoreError,
)
from connector.store import ColumnInfo, DatasetInfo, list_datasets
from connector.store_ingest import LoadRequest, ingest_request
from connector.version_log import VersionInfo, list_versions

SOCKET_FOLDER = "state/ingest"  # in the home; mode 0700
SOCKET_NAME = "ingest.sock"  # mode 0600
MAX_MESSAGE_BYTES = 1 << 20
# A Unix socket's path is limited to 108 bytes; longer ones are reached through the folder.
_MAX_SOCKET_PATH = 100
_ERRORS: Mapping[str, Callable[[str], ConnectorError]] = {
    "BackupError": BackupError,
    "DataError": DataError,
    "LoadedNotRead": LoadedNotRead,
    "StoreBusy": StoreBusy,
    "StoreError": StoreError,
}


def socket_path(settings: Settings) -> Path:
    """Where the running server listens for ingest requests."""
    return settings.home / SOCKET_FOLDER / SOCKET_NAME


@contextmanager
def reachable_path(path: Path) -> Iterator[str]:
    """path as a socket address, through /proc/self/fd when it is too long for one."""
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        yield str(path)
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


def info_json(info: DatasetInfo) -> dict[str, Any]:
    """A dataset's metadata as JSON fields."""
    return {
        "name": info.name,
        "description": info.description,
        "rows": info.rows,
        "columns": [[c.name, c.type] for c in info.columns],
        "ingested_at": info.ingested_at.isoformat(),
        "version": info.version,
        "replaced_at": info.replaced_at,
    }


def info_from_json(raw: Mapping[str, Any]) -> DatasetInfo:
    """The inverse of info_json."""
    return DatasetInfo(
        str(raw["name"]),
        str(raw["description"]),
        int(raw["rows"]),
        tuple(ColumnInfo(str(n), str(t)) for n, t in raw["columns"]),
        dt.datetime.fromisoformat(str(raw["ingested_at"])),
        int(raw["version"]),
        int(raw["replaced_at"]),
    )


def request_json(request: LoadRequest) -> dict[str, Any]:
    """A load request as JSON fields (the file as an absolute path)."""
    return {
        "op": "ingest",
        "source": str(request.source.resolve()),
        "dataset": request.dataset,
        "mode": request.mode,
        "description": request.description,
        "format": request.file_format,
        "csv_options": dict(request.csv_options),
        "normalise_names": request.normalise_names,
        "sha256": request.sha256,
        "once": request.once,
    }


def error_json(error: ConnectorError) -> dict[str, Any]:
    """A refusal as JSON fields."""
    fields: dict[str, Any] = {"ok": False, "kind": type(error).__name__, "message": error.message}
    if isinstance(error, AlreadyLoaded):
        fields["source"] = error.source
    return fields


def _raise(answer: Mapping[str, Any]) -> None:
    message = str(answer.get("message", "the server refused the request"))
    kind = str(answer.get("kind", ""))
    if kind == "AlreadyLoaded":
        raise AlreadyLoaded(message, source=str(answer.get("source", "")))
    raise _ERRORS.get(kind, StoreError)(message)


def _ask(settings: Settings, message: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The server's answer to message; None when no server listens on this home."""
    path = socket_path(settings)
    if not path.exists():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as channel:
        try:
            with reachable_path(path) as address:
                channel.connect(address)
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # left behind by a server that stopped without removing it
        except PermissionError:
            raise StoreBusy(
                f"the server of this home runs as another OS user: {path} is not yours; run "
                "the command as the user the server runs as"
            ) from None
        channel.sendall(json.dumps(message).encode() + b"\n")
        channel.shutdown(socket.SHUT_WR)
        answer = read_message(channel, StoreError("the running server's answer is too long"))
    try:
        decoded: Mapping[str, Any] = json.loads(answer)
    except ValueError:
        raise StoreError("the running server gave an answer that could not be read") from None
    if not decoded.get("ok"):
        _raise(decoded)
    return decoded


def read_message(channel: socket.socket, too_long: ConnectorError) -> bytes:
    """Everything the other side sends until it shuts down its end; too_long once that
    passes MAX_MESSAGE_BYTES (the socket's two sides use one bound)."""
    chunks, size = [], 0
    while chunk := channel.recv(65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_MESSAGE_BYTES:
            raise too_long
    return b"".join(chunks)


def submit(settings: Settings, request: LoadRequest) -> DatasetInfo:
    """Load a file: through the running server when there is one, else directly."""
    answer = _ask(settings, request_json(request))
    if answer is None:
        return ingest_request(settings.database, request)
    return info_from_json(answer["dataset"])


def home_versions(settings: Settings, dataset: str) -> list[VersionInfo]:
    """A dataset's version log: from the running server when there is one, else the file."""
    answer = _ask(settings, {"op": "versions", "dataset": dataset})
    if answer is None:
        return list_versions(settings.database, dataset)
    return [
        VersionInfo(
            int(raw["version"]),
            str(raw["mode"]),
            int(raw["rows_before"]),
            int(raw["rows_after"]),
            str(raw["source"]),
            str(raw["sha256"]),
            dt.datetime.fromisoformat(str(raw["ingested_at"])),
        )
        for raw in answer["versions"]
    ]


def version_json(version: VersionInfo) -> dict[str, Any]:
    """One entry of a version log as JSON fields."""
    fields = dataclasses.asdict(version)
    fields["ingested_at"] = version.ingested_at.isoformat()
    return fields


def server_snapshot(settings: Settings, target: Path) -> bool:
    """Have the running server copy the member's DuckDB file (and its write-ahead log) to
    target, as of one moment; False when no server runs on this home."""
    return _ask(settings, {"op": "snapshot", "target": str(target.resolve())}) is not None


def home_datasets(settings: Settings) -> list[DatasetInfo]:
    """The home's datasets: from the running server when there is one, else from the file."""
    answer = _ask(settings, {"op": "datasets"})
    if answer is None:
        return list_datasets(settings.database)
    return [info_from_json(raw) for raw in answer["datasets"]]
