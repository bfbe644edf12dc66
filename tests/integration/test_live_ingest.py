"""Live data (issue 14): ingest while a real server answers a steady query load over mTLS,
dataset versions, incremental reads with --since-version, and the watched drop folder."""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pytest

from connector import __version__
from connector.audit_chain import read_entries
from connector.client import Peer, receipt_of
from connector.config import load_settings
from connector.errors import PermissionDenied, QueryRejected
from connector.ingest_client import home_datasets
from connector.server import RunningServer
from connector.store import list_datasets
from tests.conftest import Member, connect, policy_text, run_cli, wait_for, write_defects_csv

PURPOSE = "quality-benchmarking"
AGGREGATES = "benchmark-aggregates"
SHOWN = "[plant, defects, week]"
ALLOWED_PLANTS = ("Regensburg", "Dingolfing")
SHAPED = f"""\
  mask: {{part_no: hash}}
rows:
  where: {{plant: [{", ".join(ALLOWED_PLANTS)}]}}
"""
AGGREGATE_ONLY = "aggregate_only: {min_group_size: 10}\n"
NOISY = "noisy-benchmarks"
NOISY_TERMS = (
    "aggregate_only:\n  min_group_size: 10\n"
    "  noise: {epsilon: 1, epsilon_per_day: 100, bounds: {defects: [0, 1000]}}\n"
)


@dataclass
class Live:
    """carmaker serving part_defects (masked and filtered, plus an aggregate-only grant)
    and stock (plain) to supplier-a, with live ingest."""

    provider: Member
    grantee: Member
    server: RunningServer
    folder: Path
    files: Iterator[int] = field(default_factory=lambda: iter(range(1_000)))

    def peer(self) -> Peer:
        return connect(self.server, self.grantee)

    def csv(self, rows: int, *, offset: int = 0) -> Path:
        """A part-defects file of its own name; rows differ from other files' by week."""
        path = write_defects_csv(self.folder / f"batch-{next(self.files)}.csv", rows)
        if offset:
            text = path.read_text().replace("2026-", f"{2026 + offset}-")
            path.write_text(text)
        return path

    def ingest(self, path: Path, dataset: str, *extra: str) -> None:
        args: list[str | Path] = ["ingest", "--home", self.provider.home, path]
        assert run_cli(*args, "--dataset", dataset, *extra) == 0


def _shaped_policy(policy_id: str, purposes: str, extra: str) -> str:
    return (
        policy_text(policy_id, members="[supplier-a]", columns=SHOWN, purposes=purposes)
        + SHAPED
        + extra
    )


@pytest.fixture(scope="module")
def live(
    module_dir: Path,
    module_member: Callable[[str], Member],
    module_serve: Callable[[Member], RunningServer],
) -> Live:
    provider, grantee = module_member("carmaker"), module_member("supplier-a")
    folder = module_dir / "files"
    folder.mkdir()
    provider.ingest(write_defects_csv(folder / "first.csv", 200), "part_defects")
    provider.ingest(write_defects_csv(folder / "stock.csv", 40), "stock")
    provider.write_policy("q.yaml", _shaped_policy("q", f"[{PURPOSE}]", ""))
    provider.write_policy("agg.yaml", _shaped_policy("agg", f"[{AGGREGATES}]", AGGREGATE_ONLY))
    provider.write_policy("noisy.yaml", _shaped_policy("noisy", f"[{NOISY}]", NOISY_TERMS))
    provider.write_policy(
        "s.yaml",
        policy_text(
            "s", members="[supplier-a]", datasets="[stock]", columns="[plant, part_no, week]"
        ),
    )
    return Live(provider, grantee, module_serve(provider), folder)


def _allowed_rows(*files: Path) -> int:
    plants = ", ".join(f"'{p}'" for p in ALLOWED_PLANTS)
    total = 0
    # A connection of its own: a result left unread on DuckDB's shared default connection
    # breaks the next test in this process that uses it.
    with duckdb.connect() as con:
        for path in files:
            sql = f"SELECT count(*) FROM '{path}' WHERE plant IN ({plants})"
            row = con.execute(sql).fetchone()
            total += int(row[0]) if row else 0
    return total


def _version(peer: Peer, dataset: str) -> int:
    return next(d.version for d in peer.catalog() if d.name == dataset)


class QueryLoad:
    """Threads that query without pause and keep every answer (and every failure)."""

    def __init__(self, live: Live, queries: list[tuple[str, str]], threads: int = 3) -> None:
        self._live = live
        self._queries = queries
        self._stop = threading.Event()
        self._answered = threading.Condition()  # notified at each answer and failure
        self.answers: collections.Counter[tuple[str, int]] = collections.Counter()
        self.failures: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> QueryLoad:
        for thread in self._threads:
            thread.start()
        self.wait_for_more(3)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def wait_for_more(self, answers: int = 4, timeout: float = 15.0) -> None:
        """Wait until the load has had this many more answers (or a failure)."""
        with self._answered:
            wanted = self.answers.total() + answers
            if not self._answered.wait_for(
                lambda: bool(self.failures) or self.answers.total() >= wanted, timeout
            ):
                pytest.fail(f"the load had no {answers} more answers within {timeout} s")

    def _run(self) -> None:
        with self._live.peer() as peer:
            while not self._stop.is_set():
                for sql, purpose in self._queries:
                    try:
                        table = peer.query(sql, purpose)
                    except BaseException as error:
                        with self._answered:
                            self.failures.append(error)
                            self._answered.notify_all()
                        return
                    with self._answered:
                        self.answers[(sql, int(table.column(0)[0].as_py()))] += 1
                        self._answered.notify_all()


COUNT_DEFECTS = "SELECT count(*) AS n FROM part_defects"
COUNT_STOCK = "SELECT count(*) AS n FROM stock"


@pytest.mark.slow  # a steady query load over five ingests: about 2 s
def test_appends_and_replaces_while_serving_fail_no_query_and_show_before_or_after(
    live: Live,
) -> None:
    first = live.folder / "first.csv"
    with live.peer() as peer:
        before = _version(peer, "part_defects")
        assert peer.query(COUNT_DEFECTS, PURPOSE)["n"][0].as_py() == _allowed_rows(first)
    appended = [live.csv(rows) for rows in (17, 40, 3)]
    # The first replacement drops a granted column: a query decided on the old columns must
    # never run on the new table (nor the other way round).
    narrow = live.folder / "narrow.csv"
    narrow.write_text("plant,part_no,defects\n" + "Leipzig,P-1,3\n" * 25)
    replacements = [narrow, live.csv(90)]
    load = QueryLoad(live, [(COUNT_DEFECTS, PURPOSE), (COUNT_STOCK, PURPOSE)])
    with load:
        for path in appended:
            live.ingest(path, "part_defects", "--append")
            load.wait_for_more()
        for path in replacements:
            live.ingest(path, "stock", "--replace")
            load.wait_for_more()
    assert load.failures == []
    defect_states = {_allowed_rows(first, *appended[:n]) for n in range(len(appended) + 1)}
    stock_states = {40, 25, 90}
    for (sql, answer), _ in load.answers.items():
        assert answer in (defect_states if sql == COUNT_DEFECTS else stock_states), (sql, answer)
    # The load saw data before the first append and after the last one.
    assert (COUNT_DEFECTS, _allowed_rows(first, *appended)) in load.answers
    with live.peer() as peer:
        assert _version(peer, "part_defects") == before + len(appended)
        table = peer.query(COUNT_DEFECTS, PURPOSE)
        assert table["n"][0].as_py() == _allowed_rows(first, *appended)
        assert receipt_of(table).versions == {"part_defects": [0, before + len(appended)]}
        assert peer.query(COUNT_STOCK, PURPOSE)["n"][0].as_py() == 90


def test_since_version_sends_exactly_the_appended_rows_under_the_same_masks_and_filters(
    live: Live,
) -> None:
    sql = "SELECT plant, part_no, defects, week FROM part_defects"
    with live.peer() as peer:
        version = _version(peer, "part_defects")
        whole_before = peer.query(sql, PURPOSE).to_pylist()
        appended = live.csv(30, offset=3)
        live.ingest(appended, "part_defects", "--append")
        new = peer.query(sql, PURPOSE, since_version=version)
        whole_after = peer.query(sql, PURPOSE).to_pylist()
        nothing_new = peer.query(sql, PURPOSE, since_version=version + 1)
    added = collections.Counter(map(tuple_of, whole_after)) - collections.Counter(
        map(tuple_of, whole_before)
    )
    assert sorted(map(tuple_of, new.to_pylist())) == sorted(added.elements())
    assert new.num_rows == _allowed_rows(appended) > 0
    assert {row["plant"] for row in new.to_pylist()} <= set(ALLOWED_PLANTS)
    assert all(len(row["part_no"]) == 64 for row in new.to_pylist())  # hashed, as in full reads
    assert receipt_of(new).versions == {"part_defects": [version, version + 1]}
    assert nothing_new.num_rows == 0
    # The provider's audit log says which data each answer covered, as the receipt does.
    log = live.provider.home / "audit" / "audit.jsonl"
    answered = [e for e in read_entries(log) if e["type"] == "request" and e["kind"] == "query"]
    assert answered[-1]["versions"] == {"part_defects": [version + 1, version + 1]}
    assert answered[-2]["versions"] == {"part_defects": [0, version + 1]}


def tuple_of(row: dict[str, object]) -> tuple[object, ...]:
    return tuple(row.values())


def test_since_version_is_refused_on_exact_aggregates_and_kept_under_noise(live: Live) -> None:
    # Exact aggregates since N-1 and since N both pass the minimum group size, yet their
    # difference is what version N appended: one row, here.
    sql = "SELECT plant, count(*) AS n, sum(defects) AS d FROM part_defects GROUP BY plant"
    with live.peer() as peer:
        version = _version(peer, "part_defects")
        live.ingest(live.csv(1), "part_defects", "--append")
        live.ingest(live.csv(44), "part_defects", "--append")
        for since in (version, version + 1):
            with pytest.raises(PermissionDenied, match="aggregate-only without noise") as refused:
                peer.query(sql, AGGREGATES, since_version=since)
            assert refused.value.reasons == [
                "dataset part_defects is aggregate-only without noise, so it is not read by "
                "version (since_version): two such reads would tell the rows of one version "
                "apart; read it whole"
            ]
        assert peer.query(sql, AGGREGATES).num_rows == 2  # whole reads go on
        with pytest.raises(QueryRejected, match="answers with noise"):
            peer.query("SELECT * FROM part_defects", NOISY, since_version=version)
        noisy = peer.query(sql, NOISY, since_version=version + 1).to_pylist()
    # 44 new rows over 4 plants, 2 of them allowed: 11 each, over the minimum of 10.
    assert sorted(row["plant"] for row in noisy) == ["Dingolfing", "Regensburg"]
    audit = read_entries(live.provider.home / "audit" / "audit.jsonl")
    entries = [e for e in audit if e.get("purpose") == AGGREGATES]
    denied = [e for e in entries if "aggregate-only without noise" in str(e.get("reasons"))]
    assert [e["decision"] for e in denied] == ["deny", "deny"]


def test_since_version_is_refused_after_a_replace_or_ahead_of_the_dataset(live: Live) -> None:
    with live.peer() as peer:
        stock = _version(peer, "stock")
        live.ingest(live.csv(12), "stock", "--replace")
        with pytest.raises(QueryRejected, match="replaced at version"):
            peer.query(COUNT_STOCK, PURPOSE, since_version=stock)
        with pytest.raises(QueryRejected, match="ahead of it"):
            peer.query(COUNT_STOCK, PURPOSE, since_version=stock + 5)
        with pytest.raises(QueryRejected, match="one dataset"):
            peer.query(
                "SELECT count(*) FROM stock JOIN part_defects USING (plant)",
                PURPOSE,
                since_version=1,
            )
        explained = peer.explain(COUNT_STOCK, PURPOSE, since_version=stock + 1)
        assert "rows added after version" in explained.relations[0].definition
        # Rows appended after the replace are readable again.
        live.ingest(live.csv(5), "stock", "--append")
        table = peer.query(COUNT_STOCK, PURPOSE, since_version=stock + 1)
        assert table["n"][0].as_py() == 5


def test_concurrent_ingests_into_two_datasets_and_into_one_all_land(live: Live) -> None:
    with live.peer() as peer:
        start = {name: _version(peer, name) for name in ("part_defects", "stock")}
        rows = peer.query(COUNT_STOCK, PURPOSE)["n"][0].as_py()
    jobs = [("stock", live.csv(4)) for _ in range(3)] + [("part_defects", live.csv(8))] * 2
    statuses: list[int] = []

    def load(dataset: str, path: Path) -> None:
        args = ("ingest", "--home", live.provider.home, path, "--dataset", dataset, "--append")
        statuses.append(run_cli(*args))

    threads = [threading.Thread(target=load, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert statuses == [0] * len(jobs)
    with live.peer() as peer:
        assert _version(peer, "stock") == start["stock"] + 3
        assert _version(peer, "part_defects") == start["part_defects"] + 2
        assert peer.query(COUNT_STOCK, PURPOSE)["n"][0].as_py() == rows + 12


def test_watched_folder_loads_each_file_once_also_after_a_restart_and_sets_bad_ones_aside(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    watch = ("ingest", "--home", live.provider.home, "--watch", drop, "--dataset", "stock")
    with live.peer() as peer:
        version = _version(peer, "stock")
        rows = peer.query(COUNT_STOCK, PURPOSE)["n"][0].as_py()
    good = live.csv(6)
    (drop / "good.csv").write_bytes(good.read_bytes())
    (drop / "bad.csv").write_text("plant,part_no\nLeipzig\n")  # a row too short
    (drop / "partial.csv.part").write_text("still being written")
    assert run_cli(*watch, "--append", "--once") == 1  # one file failed
    assert sorted(p.name for p in (drop / "done").iterdir()) == ["good.csv"]
    assert sorted(p.name for p in (drop / "failed").iterdir()) == ["bad.csv", "bad.csv.reason"]
    assert "stock" in (drop / "failed" / "bad.csv.reason").read_text()
    assert (drop / "partial.csv.part").exists()
    # The same content again under another name: not loaded twice, set aside with why.
    (drop / "again.csv").write_bytes(good.read_bytes())
    # A watch stopped after a load but before the move (as after a crash or restart).
    (drop / ".loading" / "good.csv").write_bytes(good.read_bytes())
    capsys.readouterr()
    assert run_cli(*watch, "--append", "--once") == 1
    out = capsys.readouterr().out
    assert "good.csv: already" in out
    assert "again.csv: failed" in out
    assert "loaded" in (drop / "failed" / "again.csv.reason").read_text()
    assert sorted(p.name for p in (drop / "done").iterdir()) == ["good.1.csv", "good.csv"]
    assert list((drop / ".loading").iterdir()) == []
    with live.peer() as peer:
        assert _version(peer, "stock") == version + 1
        assert peer.query(COUNT_STOCK, PURPOSE)["n"][0].as_py() == rows + 6


@pytest.mark.slow  # a `python -m connector` process of its own: about 2 s
def test_watch_runs_in_the_foreground_until_sigterm(live: Live, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    with live.peer() as peer:
        version = _version(peer, "stock")
    command = [sys.executable, "-m", "connector", "ingest", "--home", str(live.provider.home)]
    command += ["--watch", str(drop), "--dataset", "stock", "--append", "--interval", "0.1"]
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True) as watcher:
        try:
            staged = tmp_path / "new.csv.tmp"
            staged.write_bytes(live.csv(3).read_bytes())
            staged.rename(drop / "new.csv")  # how a writer should drop a file
            wait_for((drop / "done" / "new.csv").exists, timeout=30)
            watcher.terminate()
            assert watcher.wait(timeout=30) == 0
        finally:
            watcher.kill()
        assert watcher.stderr is not None
        assert "new.csv loaded into stock" in watcher.stderr.read()
    with live.peer() as peer:
        assert _version(peer, "stock") == version + 1


def test_version_is_shown_by_the_command_and_in_the_catalog(
    live: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        run_cli("--version")
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"connector {__version__}"
    with live.peer() as peer:
        peer.catalog()
        assert peer.provider_version == __version__


def test_policy_test_and_datasets_work_while_the_server_holds_the_file(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        "- name: supplier-a reads plants, part numbers hashed\n"
        "  member: supplier-a\n"
        f"  purpose: {PURPOSE}\n"
        "  sql: SELECT plant, defects FROM part_defects\n"
        "  expect: {decision: allow, columns: [plant, defects]}\n"
        "- name: not for marketing\n"
        "  member: supplier-a\n"
        "  purpose: marketing\n"
        "  sql: SELECT plant FROM part_defects\n"
        "  expect: {decision: deny}\n"
    )
    assert run_cli("policy", "test", "--home", live.provider.home, cases) == 0
    assert run_cli("datasets", "--home", live.provider.home) == 0
    out = capsys.readouterr().out
    assert "part_defects" in out
    assert "(version " in out


def test_datasets_versions_lists_the_manifest_of_what_was_loaded(
    live: Live, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert run_cli("datasets", "--home", live.provider.home, "--versions", "part_defects") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("1  ")
    assert "replace  rows 0->200  first.csv" in lines[0]
    assert all(" append  " in line for line in lines[1:])
    assert run_cli("datasets", "--home", live.provider.home, "--versions", "nothing") == 1


def test_backups_taken_while_ingests_commit_each_hold_one_committed_state(
    live: Live, tmp_path: Path
) -> None:
    # The running server copies its file for `connector backup` with no commit landing
    # meanwhile: each archive restores to the rows of exactly one version, never half a load.
    before = {info.name: info for info in home_datasets(load_settings(live.provider.home))}
    base_rows, base_version = before["stock"].rows, before["stock"].version
    files = [live.csv(7) for _ in range(6)]

    def append_all() -> None:
        for path in files:
            live.ingest(path, "stock", "--append")

    appending = threading.Thread(target=append_all)
    appending.start()
    archives: list[Path] = []

    def back_up() -> None:
        archive = tmp_path / f"backup-{len(archives)}.tar.gz"
        assert run_cli("backup", "--home", live.provider.home, "--output", archive) == 0
        archives.append(archive)

    while appending.is_alive():
        back_up()
    appending.join(timeout=60)
    back_up()  # after every load
    for n, archive in enumerate(archives):
        home = tmp_path / f"restored-{n}"
        assert run_cli("restore", archive, "--home", home) == 0
        stock = {info.name: info for info in list_datasets(load_settings(home).database)}["stock"]
        assert stock.rows == base_rows + 7 * (stock.version - base_version), (n, stock)
    assert stock.version == base_version + 6  # the last archive
    assert len(archives) > 2, "no archive was taken while the loads ran"


def test_a_watched_folder_never_follows_links_nor_expands_patterns(
    live: Live, tmp_path: Path
) -> None:
    # Whoever drops files must not make the connector load a file of its own (a key, the
    # audit log) into a dataset peers may be granted, by a link or by a name DuckDB's
    # readers would expand as a pattern.
    drop = tmp_path / "drop"
    drop.mkdir()
    secret = tmp_path / "secret.csv"
    secret.write_bytes(live.csv(3).read_bytes())
    (drop / "link.csv").symlink_to(secret)
    (drop / "s*.csv").write_bytes(live.csv(2).read_bytes())
    with live.peer() as peer:
        version = _version(peer, "stock")
    watch = ("ingest", "--home", live.provider.home, "--watch", drop, "--dataset", "stock")
    assert run_cli(*watch, "--append", "--once") == 1  # the pattern-named file is set aside
    assert (drop / "link.csv").is_symlink()  # left where it was, never read
    assert "pattern" in (drop / "failed" / "s*.csv.reason").read_text()
    assert not (drop / "done").exists() or not list((drop / "done").iterdir())
    with live.peer() as peer:
        assert _version(peer, "stock") == version
