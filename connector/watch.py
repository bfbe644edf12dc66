"""A watched drop folder: each new file in it is loaded into one dataset exactly once.

MES and quality systems hand data over by dropping files. A file is taken once it has not
changed for one polling interval (or at once when it was renamed into the folder, the safe
way to write one), moved into DIR/.loading (so a writer that is still busy with it cannot
change what is loaded), loaded, then moved to DIR/done/, or to DIR/failed/ beside a
NAME.reason text saying why. A bad file never stops the watch.

Exactly once, also across restarts and crashes: the file's content hash is recorded in the
dataset's version log in the same transaction as its rows, and a load of content already in
the log is refused. A file found in .loading at start (the watch stopped while loading it)
is loaded again: it either commits now or is found in the log and moved to done/.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from connector.errors import AlreadyLoaded, ConnectorError, LoadedNotRead, StoreBusy
from connector.store import DatasetInfo
from connector.store_ingest import LoadRequest

log = logging.getLogger(__name__)

DONE = "done"
FAILED = "failed"
LOADING = ".loading"
REASON_SUFFIX = ".reason"
# Names writers use for files still being written; such files are never taken.
WILDCARDS = "*?["  # DuckDB's file readers expand these in a path
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart", REASON_SUFFIX)

Submit = Callable[[LoadRequest], DatasetInfo]


@dataclass(frozen=True)
class Outcome:
    """What became of one file: loaded, already loaded, set aside (failed) or retried."""

    name: str
    result: str  # "loaded" | "already" | "failed" | "retry"
    detail: str = ""


class DropFolder:
    """Loads the files that appear in folder with the settings of template."""

    def __init__(self, folder: Path, template: LoadRequest, submit: Submit) -> None:
        self.folder = folder
        self._template = template
        self._submit = submit
        self._seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime) at the last scan
        for sub in (DONE, FAILED, LOADING):
            (folder / sub).mkdir(parents=True, exist_ok=True)

    def run(self, stopped: Callable[[float], bool], interval: float) -> None:
        """Scan, then wait with stopped(interval), until it says True."""
        log.info(
            "watching %s: new files go into dataset %s (%s)",
            self.folder,
            self._template.dataset,
            self._template.mode,
        )
        while True:
            try:
                self.scan()
            except OSError:
                log.exception("scanning %s failed; trying again", self.folder)
            if stopped(interval):
                return

    def scan(self, *, settled: bool = False) -> list[Outcome]:
        """One pass: files left in .loading first, then the new files that have settled
        (all of them at once when settled is True)."""
        outcomes = [self._load(path) for path in _files(self.folder / LOADING)]
        for path in self._settled(all_now=settled):
            taken = _free_name(self.folder / LOADING, path.name)
            try:
                path.rename(taken)
            except FileNotFoundError:
                continue  # taken away meanwhile
            outcomes.append(self._load(taken))
        return outcomes

    def _settled(self, *, all_now: bool) -> list[Path]:
        files = [p for p in _files(self.folder) if not p.name.endswith(PARTIAL_SUFFIXES)]
        seen, ready = {}, []
        for path in files:
            try:
                info = path.lstat()
            except FileNotFoundError:
                continue
            seen[path.name] = (info.st_size, info.st_mtime_ns)
            if all_now or self._seen.get(path.name) == seen[path.name]:
                ready.append(path)
        self._seen = {n: s for n, s in seen.items() if n not in {p.name for p in ready}}
        return ready

    def _load(self, path: Path) -> Outcome:
        if not stat.S_ISREG(path.lstat().st_mode):  # replaced by a link since it was listed
            return self._set_aside(path, "not a regular file (links are not followed)")
        if any(c in path.name for c in WILDCARDS):
            return self._set_aside(
                path, "the file name has * ? or [, which the loader reads as a pattern; rename it"
            )
        try:
            request = dataclasses.replace(
                self._template, source=path, sha256=_sha256(path), once=True
            )
            info = self._submit(request)
        except AlreadyLoaded as already:
            if already.source == path.name:  # loaded before the watch stopped: finish the move
                self._move(path, DONE)
                return Outcome(path.name, "already", already.message)
            return self._set_aside(path, already.message)
        except LoadedNotRead as committed:
            self._move(path, DONE)  # in the database: a second load would double its rows
            log.warning("%s loaded into %s: %s", path.name, self._template.dataset, committed)
            return Outcome(path.name, "loaded", committed.message)
        except StoreBusy as busy:
            log.warning("%s not loaded yet (tried again later): %s", path.name, busy.message)
            return Outcome(path.name, "retry", busy.message)
        except ConnectorError as error:
            return self._set_aside(path, error.message)
        except OSError as error:  # unreadable (e.g. dropped by another user with mode 0600)
            return self._set_aside(path, f"the file cannot be read: {error.strerror}")
        except Exception as error:  # the watch must outlive any one file
            log.exception("loading %s failed unexpectedly", path.name)
            return self._set_aside(path, f"the connector failed unexpectedly: {error!r}")
        self._move(path, DONE)
        log.info(
            "%s loaded into %s: version %d, %d rows", path.name, info.name, info.version, info.rows
        )
        return Outcome(path.name, "loaded", f"version {info.version}")

    def _set_aside(self, path: Path, reason: str) -> Outcome:
        moved = self._move(path, FAILED)
        when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        text = f"{when} not loaded into {self._template.dataset}: {reason}\n"
        moved.with_name(moved.name + REASON_SUFFIX).write_text(text, encoding="utf-8")
        log.warning("%s set aside in %s: %s", path.name, moved.parent, reason)
        return Outcome(path.name, "failed", reason)

    def _move(self, path: Path, where: str) -> Path:
        target = _free_name(self.folder / where, path.name)
        path.rename(target)
        return target


def _files(folder: Path) -> list[Path]:
    """The regular files in folder, oldest first (hidden ones excluded)."""
    found = []
    for path in folder.iterdir():
        try:
            # Links are never followed: whoever drops files must not make the connector
            # load (and share) a file of its own, such as a key or the audit log.
            info = path.lstat()
        except FileNotFoundError:
            continue  # taken away meanwhile
        if stat.S_ISREG(info.st_mode) and not path.name.startswith("."):
            found.append((info.st_mtime_ns, path.name, path))
    return [path for _, _, path in sorted(found)]


def _free_name(folder: Path, name: str) -> Path:
    """folder/name, or folder/STEM.N.SUFFIX when a file of that name is there already (the
    suffix stays last: it tells the file's format)."""
    plain = Path(name)
    target, n = folder / name, 1
    while target.exists() or target.with_name(target.name + REASON_SUFFIX).exists():
        target, n = folder / f"{plain.stem}.{n}{plain.suffix}", n + 1
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
