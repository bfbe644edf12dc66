"""Shared fixtures: a throwaway data space, member homes made by the real CLI, real servers.

Servers listen on 127.0.0.1 port 0 with real certificates; nothing is mocked.
"""

from __future__ import annotations

import datetime as dt
import gc
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from connector.cli.main import main as cli
from connector.client import Peer, PeerIdentity
from connector.config import DEFAULT_FLIGHT_LISTEN, load_settings
from connector.identity import create_dataspace_ca
from connector.server import RunningServer, start_server
from tests.in_process import InProcessPeer

DATASPACE = "test-space"


# `--dist loadscope --no-loadscope-reorder` (the Makefile) gives each worker one module, then
# one more each, then the next module to whichever is free, in this order (without the flag
# xdist puts the modules with most tests first, and the longest ones ran last). The memory
# blow-ups and the audit-record tests start on different workers (the latter's short
# deadlines miss requests under the blow-ups' memory pressure); the demo and the wheel
# build, which time nothing, run beside them.
RUN_FIRST = (
    "tests/security/test_memory_bounds.py",
    "tests/integration/test_demo.py",
    "tests/security/test_audit_record.py",
    "tests/integration/test_wheel_install.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """RUN_FIRST, then modules by their number of slow tests (each module's tests stay
    together and in order), so the long ones start at once and the many short ones fill in
    at the end, rather than one worker still busy while the other waits."""
    slow = Counter(item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow"))

    def rank(item: pytest.Item) -> tuple[int, int]:
        module = item.nodeid.split("::")[0]
        first = RUN_FIRST.index(module) if module in RUN_FIRST else len(RUN_FIRST)
        return first, -slow[module]

    items.sort(key=rank)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Keep the collector from walking, again and again, what lives for the whole session.

    Modules, test items and fixtures definitions are made once: frozen, a full collection
    no longer visits them. The young generation is collected ten times less often (a
    test worker makes millions of short-lived objects; cycles among them are few).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


def run_cli(*args: str | Path) -> int:
    """Run the connector command line in-process; returns its exit status."""
    return cli([str(a) for a in args])


@pytest.fixture(scope="session")
def dataspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development data-space CA shared by the whole test session."""
    directory = tmp_path_factory.mktemp("dataspace")
    create_dataspace_ca(directory, DATASPACE)
    return directory


@dataclass
class Member:
    """A member's home folder made by `connector init`."""

    member_id: str
    home: Path

    def write_policy(self, name: str, text: str, *, sign: bool = True) -> Path:
        """Write a policy file into the home's policies folder and (by default) sign it."""
        path = self.home / "policies" / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        if sign:
            assert run_cli("policy", "sign", "--home", self.home, path) == 0
        return path

    def ingest(self, source: Path, dataset: str, description: str = "") -> None:
        """Load a data file into the member's database through the CLI."""
        args: list[str | Path] = ["ingest", "--home", self.home, source, "--dataset", dataset]
        assert run_cli(*args, "--description", description or dataset) == 0

    def identity(self) -> PeerIdentity:
        """This member's certificate and key, for querying others."""
        return PeerIdentity.from_home(self.home)


@pytest.fixture
def make_member(tmp_path: Path, dataspace: Path) -> Callable[[str], Member]:
    """Create member homes with `connector init`."""

    def make(member_id: str) -> Member:
        return init_member(tmp_path, member_id, dataspace)

    return make


def init_member(directory: Path, member_id: str, dataspace: Path) -> Member:
    """A member home made by `connector init` in directory/member_id.

    `connector init` runs once per member id and data space in a session; each test gets a
    copy of that home (its paths are relative), so that homes cost a copy, not key making.
    """
    home = directory / member_id
    shutil.copytree(_member_template(member_id, dataspace), home)
    return Member(member_id, home)


_MEMBER_TEMPLATES: dict[tuple[Path, str], Path] = {}


def _member_template(member_id: str, dataspace: Path) -> Path:
    """A home made by `connector init` for member_id, made on first use in this session."""
    key = (dataspace, member_id)
    if key not in _MEMBER_TEMPLATES:
        home = dataspace.with_name(f"{dataspace.name}-members") / member_id
        assert run_cli("init", home, "--member", member_id, "--dataspace", dataspace) == 0
        # Servers shared by a module's attack tests see many refusals from one member: a
        # larger allowance than the default 20 before the audit log's throttle refuses.
        config = home / "connector.toml"
        text = config.read_text().replace("refusal_burst = 20", "refusal_burst = 400")
        # The Flight SQL port stays off in test homes (its fixed default port would clash
        # between servers); the Flight tests turn it on at port 0.
        text = text.replace(f'listen = "{DEFAULT_FLIGHT_LISTEN}"', 'listen = ""')
        config.write_text(text)
        _MEMBER_TEMPLATES[key] = home
    return _MEMBER_TEMPLATES[key]


MakeHomes = Callable[[Path, Callable[[str], Member]], Sequence[Member]]
_SPACE_TEMPLATES: dict[tuple[Path, str], tuple[Path, list[str]]] = {}


def from_template(directory: Path, dataspace: Path, name: str, build: MakeHomes) -> list[Member]:
    """Copy into directory the homes (and files) build(folder, make) makes, in its order.

    build runs once per name and data space in a session, with the real CLI; each caller
    gets a copy made before any server runs on it, so no state or audit entry is shared.
    """
    key = (dataspace, name)
    if key not in _SPACE_TEMPLATES:
        folder = dataspace.with_name(f"{dataspace.name}-spaces") / name
        folder.mkdir(parents=True)
        members = build(folder, lambda member_id: init_member(folder, member_id, dataspace))
        _SPACE_TEMPLATES[key] = (folder, [m.member_id for m in members])
    folder, member_ids = _SPACE_TEMPLATES[key]
    shutil.copytree(folder, directory, dirs_exist_ok=True)
    return [Member(member_id, directory / member_id) for member_id in member_ids]


@contextmanager
def servers() -> Iterator[Callable[[Member], RunningServer]]:
    """Start real servers for members on 127.0.0.1:0; all stopped when the block ends."""
    running: list[RunningServer] = []

    def start(member: Member) -> RunningServer:
        server = start_server(load_settings(member.home), "127.0.0.1:0")
        running.append(server)
        return server

    try:
        yield start
    finally:
        for server in running:
            server.stop(grace=1)


@pytest.fixture
def serve() -> Iterator[Callable[[Member], RunningServer]]:
    """Start real servers for members on 127.0.0.1:0; stopped at the end of the test."""
    with servers() as start:
        yield start


def connect(server: RunningServer, member: Member, timeout: float = 30.0) -> Peer:
    """A Peer client from member to a running server."""
    return Peer(f"127.0.0.1:{server.port}", member.identity(), timeout=timeout)


def wait_for(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll until condition() is true; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.05)


def policy_text(
    policy_id: str,
    *,
    members: str,
    datasets: str = "[part_defects]",
    purposes: str = "[quality-benchmarking]",
    columns: str = "[plant, part_no, defect_code, defects, week]",
    version: int = 1,
    valid_from: str | None = None,
    valid_until: str | None = None,
) -> str:
    """A usage policy in YAML, valid from yesterday to next year unless told otherwise."""
    today = dt.date.today()
    start = valid_from or str(today - dt.timedelta(days=1))
    end = valid_until or str(today + dt.timedelta(days=365))
    return f"""\
id: {policy_id}
version: {version}
description: Test policy {policy_id}
datasets: {datasets}
grantees: {{members: {members}}}
purposes: {purposes}
valid: {{from: {start}, until: {end}}}
columns:
  allow: {columns}
"""


def write_defects_csv(path: Path, rows: int = 200) -> Path:
    """A part-defects table: plants, parts, weekly defect counts and a confidential price."""
    plants = ["Regensburg", "Dingolfing", "Leipzig", "Munich"]
    lines = ["plant,part_no,defect_code,defects,week,supplier_price"]
    for i in range(rows):
        lines.append(
            f"{plants[i % 4]},P-{1000 + i % 25},D{i % 7},{(i * 37) % 19},"
            f"{dt.date(2026, 1, 5) + dt.timedelta(weeks=i % 40)},{100 + (i * 13) % 400}.5"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


ProviderPair = Callable[..., tuple[Member, Member]]


@pytest.fixture
def provider_pair(tmp_path: Path, dataspace: Path) -> ProviderPair:
    """carmaker with part_defects and policy q for supplier-a; settings edit connector.toml,
    policy_extra is added to q (signed again)."""

    def make(
        *, settings: dict[str, str] | None = None, policy_extra: str = ""
    ) -> tuple[Member, Member]:
        # One pair of homes is built a session; each test edits its own copy, which costs a
        # file edit (and a signature) instead of an init, an ingest and a signature.
        provider, grantee = from_template(tmp_path, dataspace, "pair", _pair_homes)
        config = provider.home / "connector.toml"
        text = config.read_text()
        for old, new in sorted((settings or {}).items()):
            assert old in text, old
            text = text.replace(old, new)
        config.write_text(text)
        if policy_extra:
            provider.write_policy("q.yaml", policy_text("q", members="[supplier-a]") + policy_extra)
        return provider, grantee

    return make


def _pair_homes(folder: Path, make_member: Callable[[str], Member]) -> list[Member]:
    provider, grantee = make_member("carmaker"), make_member("supplier-a")
    provider.ingest(write_defects_csv(folder / "d.csv"), "part_defects")
    provider.write_policy("q.yaml", policy_text("q", members="[supplier-a]"))
    return [provider, grantee]


@dataclass
class Space:
    """A provider with data and a signed policy for a grantee, its server running."""

    provider: Member
    grantee: Member
    outsider: Member
    server: RunningServer

    def peer(self, member: Member | None = None, timeout: float = 30.0) -> Peer:
        return connect(self.server, member or self.grantee, timeout)

    def in_process(self, member: Member | None = None) -> InProcessPeer:
        """A peer asking this server's Provider directly (no TLS, no gRPC): for long tables."""
        return in_process_peer(self.server, member or self.grantee)


def in_process_peer(server: RunningServer, member: Member) -> InProcessPeer:
    """member asking server's Provider in this process, as the servicer would."""
    identity = member.identity()
    return InProcessPeer(server.provider, identity.cert_pem, identity.ca_pem)


def space_homes(directory: Path, make: Callable[[str], Member]) -> list[Member]:
    """The homes of a `Space` (provider, grantee, outsider), ready to serve."""
    provider, grantee, outsider = make("carmaker"), make("supplier-a"), make("supplier-b")
    provider.ingest(write_defects_csv(directory / "defects.csv"), "part_defects", "Weekly defects")
    provider.write_policy("quality.yaml", policy_text("quality-benchmark", members="[supplier-a]"))
    # Small batches, so that results of a few thousand rows already stream in many pieces.
    config = provider.home / "connector.toml"
    config.write_text(config.read_text().replace("batch_rows = 65536", "batch_rows = 1000"))
    return [provider, grantee, outsider]


def build_space(
    directory: Path, make: Callable[[str], Member], serve: Callable[[Member], RunningServer]
) -> Space:
    """carmaker offers part_defects to supplier-a for quality-benchmarking; supplier-b has none."""
    provider, grantee, outsider = space_homes(directory, make)
    return Space(provider, grantee, outsider, serve(provider))


@contextmanager
def home_put_back(space: Space) -> Iterator[Space]:
    """space, its provider's policies and connector.toml put back afterwards, and its
    server reloaded (for tests that edit a module's shared space)."""
    home = space.provider.home
    saved = home.parent / "saved-policies"
    shutil.rmtree(saved, ignore_errors=True)
    shutil.copytree(home / "policies", saved)
    config = (home / "connector.toml").read_text()
    try:
        yield space
    finally:
        shutil.rmtree(home / "policies")
        shutil.copytree(saved, home / "policies")
        (home / "connector.toml").write_text(config)
        space.server.reload()


def copied_space(
    directory: Path, dataspace: Path, serve: Callable[[Member], RunningServer]
) -> Space:
    """A `build_space` space from a copy of its homes made once per session."""
    provider, grantee, outsider = from_template(directory, dataspace, "space", space_homes)
    return Space(provider, grantee, outsider, serve(provider))


@pytest.fixture
def space(tmp_path: Path, dataspace: Path, serve: Callable[[Member], RunningServer]) -> Space:
    """carmaker offers part_defects to supplier-a for quality-benchmarking; supplier-b has none."""
    return copied_space(tmp_path, dataspace, serve)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A folder shared by the tests of one module (for homes they only read)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def module_member(module_dir: Path, dataspace: Path) -> Callable[[str], Member]:
    """Create member homes shared by the tests of one module."""
    return lambda member_id: init_member(module_dir, member_id, dataspace)


@pytest.fixture(scope="module")
def module_serve() -> Iterator[Callable[[Member], RunningServer]]:
    """Start real servers shared by the tests of one module; stopped after its last test."""
    with servers() as start:
        yield start


@pytest.fixture(scope="module")
def shared_space(
    module_dir: Path, dataspace: Path, module_serve: Callable[[Member], RunningServer]
) -> Space:
    """The `space` of one module, for tests that only query it: a test that changes its
    policies, configuration, data or quotas takes `space` (its own) instead."""
    return copied_space(module_dir / "space", dataspace, module_serve)


PORT_LINE = re.compile(r"serving on \S+ \(port (\d+)\)")
FLIGHT_PORT_LINE = re.compile(r"Arrow Flight SQL on \S+ \(port (\d+)\)")  # logged before


class ServerProcess:
    """A `connector serve` child process and what it printed."""

    def __init__(
        self,
        home: Path,
        python: str = sys.executable,
        extra: Sequence[str] = (),
        flight_listen: str = "",
    ) -> None:
        """extra: more arguments for `connector serve` (e.g. --log-format json);
        flight_listen: the Flight SQL port ("" off, whatever the home says; "127.0.0.1:0")."""
        self.process = subprocess.Popen(
            [
                python,
                "-m",
                "connector.cli.main",
                "serve",
                "--home",
                str(home),
                "--listen",
                "127.0.0.1:0",
                *extra,
                "--flight-listen",
                flight_listen,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.port = 0
        self.flight_port = 0
        self._serving = threading.Event()  # set at the port line, or when the output ends
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._serving.wait(timeout=30):
            pytest.fail(f"connector serve did not start within 30 s:\n{self.log()[-4000:]}")
        assert self.port, "".join(self.lines)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            flight = FLIGHT_PORT_LINE.search(line)
            if flight:
                self.flight_port = int(flight.group(1))
            found = PORT_LINE.search(line)
            if found:
                self.port = int(found.group(1))
                self._serving.set()
        self._serving.set()

    def log(self) -> str:
        return "".join(self.lines)

    def exit_code(self, timeout: float = 30) -> int:
        """Wait for the process to end; a process still running fails with what it logged."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"connector serve still running after {timeout:g} s:\n{self.log()[-4000:]}")
        self._reader.join(timeout=10)  # every line it wrote, before a test reads the log
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self._reader.join(timeout=10)
        assert self.process.stderr is not None
        self.process.stderr.close()
