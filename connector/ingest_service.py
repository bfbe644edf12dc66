"""Live ingest, owned by the running server: the single writer of the member's DuckDB file.

The server's DuckDB instance holds the file; peers' queries read it in read-only
transactions, and this service writes new data through a cursor of the same instance, so
DuckDB's own transactions make each ingest all or nothing, and a query that runs keeps the
snapshot it started with. The commit happens in the commit gate's exclusive turn
(commit_gate.py), with the datasets' metadata read again and the shaped copies of the old
data retired inside it. Ingests into one dataset run one after the other; into different
datasets, side by side.

Requests come over a Unix socket in HOME/state/ingest (mode 0700; the socket 0600), from
processes of the server's own OS user only (checked by the peer's credentials): the file
named is read with the rights that user has anyway.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import duckdb

from connector.backup import copy_database_files
from connector.errors import (
    BackupError,
    ConnectorError,
    DataError,
    LoadedNotRead,
    StoreError,
    first_line,
)
from connector.ingest_client import (
    MAX_MESSAGE_BYTES,
    error_json,
    info_json,
    reachable_path,
    read_message,
    version_json,
)
from connector.sandbox import SandboxDatabase
from connector.store import DatasetInfo
from connector.store_ingest import LoadRequest, load, stage

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 8  # ingest requests handled at once (more wait in the listen backlog)
READ_SECONDS = 10.0  # a request must arrive this quickly after connecting
STOP_GRACE_SECONDS = 30.0  # how long a stopping server waits for loads in progress


# A load's request, the rows it added (0 when refused) and its refusal, if any.
IngestReport = Callable[[LoadRequest, int, ConnectorError | None], None]


class LiveIngest:
    """Loads files into the running server's database; thread-safe."""

    def __init__(self, sandbox: SandboxDatabase, on_finished: IngestReport | None = None) -> None:
        """on_finished: told of every load's request and its outcome (metrics)."""
        self._sandbox = sandbox
        self._on_finished = on_finished
        self._locks: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_lock = threading.Lock()
        self.loaded = 0  # ingests committed since start

    def load(self, request: LoadRequest) -> DatasetInfo:
        """Load request's file: all of it becomes visible at once, or nothing does."""
        try:
            info, added = self._load(request)
        except ConnectorError as error:
            if self._on_finished is not None:
                self._on_finished(request, 0, error)
            raise
        if self._on_finished is not None:
            self._on_finished(request, added, None)
        return info

    def _load(self, request: LoadRequest) -> tuple[DatasetInfo, int]:
        with self._locks_lock:
            lock = self._locks[request.dataset]
        with stage(request) as staged, lock:
            before = self._sandbox.datasets().get(request.dataset)
            kept = before.rows if before is not None and request.mode == "append" else 0
            writer = self._sandbox.writer()
            try:
                info = load(writer, staged, request, commit=self._commit)
            finally:
                writer.close()
        self.loaded += 1
        log.info(
            "dataset %s: %s from %s while serving, now %d rows (version %d)",
            info.name,
            request.mode,
            request.source,
            info.rows,
            info.version,
        )
        return info, info.rows - kept

    def _commit(self, writer: duckdb.DuckDBPyConnection) -> None:
        with self._sandbox.gate.commit():
            writer.execute("COMMIT")
            try:
                self._sandbox.refresh()
            except (duckdb.Error, MemoryError) as exc:
                # Committed: saying "nothing was changed" would have the file loaded again.
                # The sandbox reads its datasets again before the next query uses them.
                raise LoadedNotRead(
                    "the file was loaded and committed, but the server could not read the "
                    f"datasets again ({first_line(exc)}); "
                    "do not load it again: `connector datasets` shows its version once the "
                    "server reads them"
                ) from None


class IngestSocket:
    """The server's ingest socket: owner-only requests to LiveIngest."""

    def __init__(self, live: LiveIngest, path: Path) -> None:
        self._live = live
        self._sandbox = live._sandbox
        self.path = path
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopping = threading.Event()

    def start(self) -> None:
        """Listen (the folder made owner-only, a socket left by a stopped server replaced)."""
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with reachable_path(self.path) as address:
                if self.path.exists() and _answers(address):
                    raise StoreError(
                        f"another connector already serves this home ({self.path} answers)"
                    )
                self.path.unlink(missing_ok=True)
                old = os.umask(0o177)  # the socket is made 0600, never briefly wider
                try:
                    listener.bind(address)
                finally:
                    os.umask(old)
            listener.listen(16)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._thread = threading.Thread(target=self._accept, name="ingest-socket", daemon=True)
        self._thread.start()
        log.info("live ingest: `connector ingest` hands files to this server over %s", self.path)

    def stop(self) -> None:
        """Stop listening and remove the socket (requests being loaded finish); once."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)
        # Loads in progress finish (or fail and change nothing) before the store closes.
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for _ in range(MAX_CONNECTIONS):
            if not self._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                log.warning("live ingest: a load still runs at stop; it will change nothing")
                break

    def _accept(self) -> None:
        while not self._stopping.is_set() and self._listener is not None:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed by stop()
            self._slots.acquire()
            try:
                threading.Thread(
                    target=self._serve, args=(connection,), name="ingest-request", daemon=True
                ).start()
            except RuntimeError:  # no thread can start now (memory limit): refuse this one
                log.warning("live ingest: no thread could start for a request; refused")
                connection.close()
                self._slots.release()

    def _serve(self, connection: socket.socket) -> None:
        try:
            with connection:
                uid = _peer_uid(connection)
                if uid != os.getuid():
                    log.warning("ingest socket: refused a process of user %s", uid)
                    _drain(connection)  # unread, so that the refusal reaches the process
                    answer: Mapping[str, Any] = {
                        "ok": False,
                        "kind": "StoreError",
                        "message": "only the server's own OS user may ingest",
                    }
                else:
                    answer = self._answer(connection)
                connection.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            log.info("ingest socket: the client went away", exc_info=True)
        except Exception:
            log.exception("ingest socket: a request failed unexpectedly")
        finally:
            self._slots.release()

    def _answer(self, connection: socket.socket) -> Mapping[str, Any]:
        try:
            message = _read_request(connection)
            op = message.get("op")
            if op == "datasets":
                return {
                    "ok": True,
                    "datasets": [info_json(i) for i in self._sandbox.datasets().values()],
                }
            if op == "versions":
                dataset = _text(message, "dataset")
                versions = self._sandbox.versions(dataset)
                return {"ok": True, "versions": [version_json(v) for v in versions]}
            if op == "ingest":
                info = self._live.load(_load_request(message))
                return {"ok": True, "dataset": info_json(info)}
            if op == "snapshot":
                self._snapshot(Path(_text(message, "target")))
                return {"ok": True}
            raise DataError(f"unknown ingest request {str(op)[:40]!r}")
        except ConnectorError as error:
            log.info("ingest refused: %s", error.message)
            return error_json(error)

    def _snapshot(self, target: Path) -> None:
        """Copy the member's file for `connector backup`: no commit lands during the copy,
        queries go on. The owner's own process asks (checked above); target is a new file."""
        if not target.is_absolute() or not target.parent.is_dir():
            raise DataError(f"the copy must go to a new file in an existing folder, not {target}")
        try:
            with self._sandbox.gate.hold():
                copy_database_files(self._sandbox.path, target)
        except OSError as exc:
            raise BackupError(f"the server cannot copy its database to {target}: {exc}") from None


def _answers(address: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(address)
        except OSError:
            return False
    return True


def _peer_uid(connection: socket.socket) -> int:
    """The OS user of the process at the other end (Linux SO_PEERCRED: pid, uid, gid)."""
    raw = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def _drain(connection: socket.socket) -> None:
    """Read and drop what the process sent (bounded); its content is never looked at."""
    connection.settimeout(READ_SECONDS)
    size = 0
    with contextlib.suppress(OSError):
        while size <= MAX_MESSAGE_BYTES and (chunk := connection.recv(65536)):
            size += len(chunk)


def _read_request(connection: socket.socket) -> Mapping[str, Any]:
    connection.settimeout(READ_SECONDS)
    data = read_message(connection, DataError("the ingest request is too long"))
    connection.settimeout(None)
    try:
        message = json.loads(data)
    except ValueError:
        raise DataError("the ingest request is not JSON") from None
    if not isinstance(message, dict):
        raise DataError("the ingest request is not a JSON object")
    return message


def _load_request(message: Mapping[str, Any]) -> LoadRequest:
    mode = message.get("mode")
    if mode not in ("replace", "append"):
        raise DataError("mode must be replace or append")
    options = message.get("csv_options") or {}
    if not isinstance(options, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in options.items()
    ):
        raise DataError("csv_options must map names to texts")
    try:
        return LoadRequest(
            source=Path(_text(message, "source")),
            dataset=_text(message, "dataset"),
            mode=mode,
            description=_optional_text(message, "description"),
            file_format=_optional_text(message, "format"),
            csv_options=options,
            normalise_names=bool(message.get("normalise_names")),
            sha256=_optional_text(message, "sha256") or "",
            once=bool(message.get("once")),
        )
    except (TypeError, ValueError):
        raise DataError("the ingest request's fields have the wrong types") from None


def _text(message: Mapping[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"the ingest request needs {key}")
    return value


def _optional_text(message: Mapping[str, Any], key: str) -> str | None:
    value = message.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(f"{key} must be a text")
    return value
