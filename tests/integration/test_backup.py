"""`connector backup` while the server runs and `connector restore` into a new home; an
archive is hostile input on restore."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pytest

from connector.backup import MANIFEST, copy_attached_database, make_backup
from connector.config import load_settings
from connector.errors import BackupError
from connector.ingest_client import home_datasets
from connector.quota import QuotaLedger
from connector.restore import restore_backup
from connector.store import list_datasets
from tests.conftest import Space, copied_space, policy_text, run_cli, servers

PURPOSE = "quality-benchmarking"
QUOTA_LIMITS = "limits: {queries_per_day: 50, rows_per_day: 100000}\n"


@pytest.fixture(scope="module")
def busy_space(module_dir: Path, dataspace: Path) -> Iterator[Space]:
    """A served space whose provider answered a few queries (audit entries, quota counts)."""
    with servers() as start:
        space = copied_space(module_dir / "space", dataspace, start)
        quota = policy_text("capacity", members="[supplier-a]", purposes="[capacity-planning]")
        space.provider.write_policy("capacity.yaml", quota + QUOTA_LIMITS)
        space.server.reload()
        with space.peer() as peer:
            peer.catalog()
            peer.query("SELECT plant, defects FROM part_defects", PURPOSE)
            peer.query("SELECT plant FROM part_defects", "capacity-planning")
        yield space


def test_backup_while_serving_restores_to_a_home_that_verifies_and_serves(
    tmp_path: Path, busy_space: Space
) -> None:
    provider = busy_space.provider
    archive = tmp_path / "carmaker.tar.gz"
    assert run_cli("backup", "--home", provider.home, "--output", archive) == 0
    assert archive.stat().st_mode & 0o077 == 0  # it holds private keys
    new = tmp_path / "restored"
    assert run_cli("restore", archive, "--home", new) == 0
    assert run_cli("audit", "verify", "--home", new) == 0
    old_settings, new_settings = load_settings(provider.home), load_settings(new)
    # The served home's datasets come from its server, the restored one's from the file.
    assert list_datasets(new_settings.database) == home_datasets(old_settings)
    for relative in (
        "connector.toml",
        "tls/key.pem",
        "tls/cert.pem",
        "tls/ca.pem",
        "keys/receipt.key",
        "keys/mask.key",
        "policies/quality.yaml",
        "policies/quality.yaml.jws",
    ):
        assert (new / relative).read_bytes() == (provider.home / relative).read_bytes(), relative
    assert (new / "tls/key.pem").stat().st_mode & 0o077 == 0
    restored_log = (new / "audit/audit.jsonl").read_bytes()
    assert (provider.home / "audit/audit.jsonl").read_bytes().startswith(restored_log)
    assert not (new / "state/shaped.duckdb").exists()  # remade at start
    # The restored home serves with its own keys and data.
    with servers() as start:
        restored = dataclasses.replace(busy_space.provider, home=new)
        server = start(restored)
        with (
            busy_space.peer() as _,
            Space(restored, busy_space.grantee, busy_space.outsider, server).peer() as peer,
        ):
            assert peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE)[
                "n"
            ].to_pylist() == [200]


def test_quota_counts_are_backed_up(tmp_path: Path, busy_space: Space) -> None:
    archive = tmp_path / "b.tar.gz"
    make_backup(load_settings(busy_space.provider.home), archive)
    summary = restore_backup(archive, tmp_path / "new")
    now = dt.datetime.now(dt.UTC)
    live = busy_space.server.provider.quotas.usage_today(now)
    assert [(m, p, u.queries, u.rows) for m, p, u in live] == [("supplier-a", "capacity", 1, 200)]
    restored = QuotaLedger(load_settings(summary.home).quota_ledger)
    try:
        assert restored.usage_today(now) == live
    finally:
        restored.close()


def test_backups_taken_while_the_audit_log_grows_each_verify(
    tmp_path: Path, busy_space: Space
) -> None:
    stop = threading.Event()

    def load() -> None:
        with busy_space.peer() as peer:
            while not stop.is_set():
                peer.catalog()

    loader = threading.Thread(target=load)
    loader.start()
    try:
        for n in range(3):
            make_backup(load_settings(busy_space.provider.home), tmp_path / f"{n}.tar.gz")
            summary = restore_backup(tmp_path / f"{n}.tar.gz", tmp_path / f"home{n}")
            assert summary.audit_message.startswith("intact")
    finally:
        stop.set()
        loader.join()


def test_backup_refuses_an_existing_output_or_one_inside_the_home(
    tmp_path: Path, busy_space: Space
) -> None:
    settings = load_settings(busy_space.provider.home)
    (tmp_path / "there.tar.gz").write_bytes(b"keep me")
    with pytest.raises(BackupError, match="exists already"):
        make_backup(settings, tmp_path / "there.tar.gz")
    assert (tmp_path / "there.tar.gz").read_bytes() == b"keep me"
    with pytest.raises(BackupError, match="inside the home"):
        make_backup(settings, settings.home / "backup.tar.gz")
    outside = dataclasses.replace(settings, ca=tmp_path / "there.tar.gz")
    with pytest.raises(BackupError, match=r"\[tls\] ca is .* outside the home"):
        make_backup(outside, tmp_path / "new.tar.gz")


@pytest.mark.parametrize("name", [MANIFEST, "notes\\draft.txt", "notes/bell\x07.txt"])
def test_backup_refuses_a_home_file_whose_name_restore_would_refuse(
    tmp_path: Path, busy_space: Space, name: str
) -> None:
    # An archive that cannot be restored is no backup: refused before anything is written.
    settings = load_settings(busy_space.provider.home)
    stray = settings.home / name
    stray.parent.mkdir(exist_ok=True)
    stray.write_text("x")
    try:
        with pytest.raises(BackupError, match="has a name a restore refuses") as refused:
            make_backup(settings, tmp_path / "b.tar.gz")
    finally:
        stray.unlink()
    assert "\x07" not in str(refused.value)  # shown escaped
    assert not (tmp_path / "b.tar.gz").exists() and list(tmp_path.iterdir()) == []


def test_restore_never_writes_over_a_home(tmp_path: Path, busy_space: Space) -> None:
    archive = tmp_path / "b.tar.gz"
    make_backup(load_settings(busy_space.provider.home), archive)
    assert run_cli("restore", archive, "--home", busy_space.provider.home) == 1
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "note.txt").write_text("mine")
    with pytest.raises(BackupError, match="not an empty folder"):
        restore_backup(archive, tmp_path / "used")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["note.txt"]
    restore_backup(archive, tmp_path / "empty")  # a new folder is fine


# -- hostile archives ---------------------------------------------------------------------


def _archive(
    path: Path, members: list[tuple[tarfile.TarInfo, bytes]], files: dict[str, bytes]
) -> Path:
    import hashlib

    manifest = {
        "format": 1,
        "files": {
            n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in files.items()
        },
    }
    body = json.dumps(manifest).encode()
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
        for member, data in members:
            tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return path


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


CONFIG = b'[member]\nid = "x"\ndataspace = "test-space"\n'
HOSTILE: dict[str, Callable[[], tuple[list[tuple[tarfile.TarInfo, bytes]], dict[str, bytes]]]] = {
    "parent path": lambda: (
        [_file("connector.toml", CONFIG), _file("../evil", b"x")],
        {"connector.toml": CONFIG, "../evil": b"x"},
    ),
    "absolute path": lambda: (
        [_file("connector.toml", CONFIG), _file("/tmp/evil", b"x")],
        {"connector.toml": CONFIG, "/tmp/evil": b"x"},
    ),
    "inner parent": lambda: (
        [_file("connector.toml", CONFIG), _file("a/../../evil", b"x")],
        {"connector.toml": CONFIG, "a/../../evil": b"x"},
    ),
    "symlink": lambda: (
        [_file("connector.toml", CONFIG), _link("tls", "/etc", tarfile.SYMTYPE)],
        {"connector.toml": CONFIG, "tls": b""},
    ),
    "hard link": lambda: (
        [_file("connector.toml", CONFIG), _link("k", "/etc/passwd", tarfile.LNKTYPE)],
        {"connector.toml": CONFIG, "k": b""},
    ),
    "device": lambda: (
        [_file("connector.toml", CONFIG), _link("d", "", tarfile.CHRTYPE)],
        {"connector.toml": CONFIG, "d": b""},
    ),
    "unlisted file": lambda: (
        [_file("connector.toml", CONFIG), _file("extra", b"x")],
        {"connector.toml": CONFIG},
    ),
    "changed file": lambda: (
        [_file("connector.toml", CONFIG + b"#")],
        {"connector.toml": CONFIG + b"!"},
    ),
    "file twice": lambda: (
        [_file("connector.toml", CONFIG), _file("connector.toml", CONFIG)],
        {"connector.toml": CONFIG},
    ),
    "missing file": lambda: (
        [_file("connector.toml", CONFIG)],
        {"connector.toml": CONFIG, "keys/receipt.key": b"k"},
    ),
    "no config": lambda: ([_file("a", b"x")], {"a": b"x"}),
    "backslash": lambda: (
        [_file("connector.toml", CONFIG), _file("..\\evil", b"x")],
        {"connector.toml": CONFIG, "..\\evil": b"x"},
    ),
}


@pytest.mark.parametrize("attack", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_and_writes_nothing(tmp_path: Path, attack: str) -> None:
    members, files = HOSTILE[attack]()
    archive = _archive(tmp_path / "hostile.tar.gz", members, files)
    target = tmp_path / "deep" / "home"
    with pytest.raises(BackupError):
        restore_backup(archive, target)
    assert not target.exists()
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == []  # no staging left
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()


def test_a_file_that_is_not_a_backup_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(BackupError, match="cannot read the backup"):
        restore_backup(tmp_path / "x.tar.gz", tmp_path / "home")
    with tarfile.open(tmp_path / "y.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("other.txt")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(BackupError, match="not a connector backup"):
        restore_backup(tmp_path / "y.tar.gz", tmp_path / "home")


def test_unwritable_places_are_errors_not_tracebacks(tmp_path: Path, busy_space: Space) -> None:
    settings = load_settings(busy_space.provider.home)
    with pytest.raises(BackupError, match="cannot write in"):
        make_backup(settings, tmp_path / "no-such-folder" / "b.tar.gz")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BackupError, match="cannot write in"):
        restore_backup(tmp_path / "b.tar.gz", tmp_path / "file" / "home")


HOLD = "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print(1, flush=True); sys.stdin.read()"


def test_a_database_held_for_writing_is_refused_with_the_reason(
    tmp_path: Path, busy_space: Space
) -> None:
    home = tmp_path / "home"
    shutil.copytree(busy_space.provider.home, home, ignore=shutil.ignore_patterns("*.sock"))
    with subprocess.Popen(
        [sys.executable, "-c", HOLD, str(home / "data.duckdb")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "1"
            with pytest.raises(BackupError, match="held for writing by another process"):
                make_backup(load_settings(home), tmp_path / "b.tar.gz")
            assert not (tmp_path / "b.tar.gz").exists()
        finally:
            holder.kill()


def test_a_process_that_holds_the_writer_can_give_the_snapshot_itself(
    tmp_path: Path, busy_space: Space
) -> None:
    home = tmp_path / "home"
    shutil.copytree(busy_space.provider.home, home, ignore=shutil.ignore_patterns("*.sock"))
    writer = duckdb.connect(str(home / "data.duckdb"))  # as a server owning the writer would
    try:
        make_backup(
            load_settings(home),
            tmp_path / "b.tar.gz",
            snapshot=lambda _source, target: copy_attached_database(writer, "data", target),
        )
    finally:
        writer.close()
    summary = restore_backup(tmp_path / "b.tar.gz", tmp_path / "new")
    assert [d.rows for d in list_datasets(summary.home / "data.duckdb")] == [200]
