"""The embedded Rego engine releases what each decision allocates (issue 17: memory grew
about 20 KB per request when regopy's allocator was loaded after libstdc++), whichever C++
library a program imports first."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DECISIONS = 600
ALLOWED_GROWTH_MB = 5.0  # the leak was about 12 MB for this many decisions (20 KB each)

SCRIPT = textwrap.dedent(
    """
    import datetime as dt, re, sys
    from pathlib import Path
    if sys.argv[3] == "duckdb, pyarrow and grpc first":
        import duckdb, pyarrow, grpc
    import connector.server  # the server's import order: grpc, duckdb, pyarrow, then Rego
    from connector.policy.engine import DecisionRequest, EmbeddedEngine
    from connector.policy.model import parse_policy

    def rss_mb():
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmRSS:\\s+(\\d+)", status).group(1)) / 1024

    engine = EmbeddedEngine([parse_policy(Path(sys.argv[1]))])
    request = DecisionRequest(
        "acme", "quality", ("part_defects",), {"part_defects": frozenset({"plant"})}, False,
        dt.datetime(2026, 6, 1, tzinfo=dt.UTC),
    )
    for _ in range(200):
        assert engine.decide(request).allow
    before = rss_mb()
    for _ in range(int(sys.argv[2])):
        engine.decide(request)
    print(rss_mb() - before)
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
@pytest.mark.parametrize("order", ["connector first", "duckdb, pyarrow and grpc first"])
def test_decisions_do_not_accumulate_memory(tmp_path: Path, order: str) -> None:
    policy = tmp_path / "grant.yaml"
    policy.write_text(
        textwrap.dedent(
            """\
            id: grant
            version: 1
            description: test
            datasets: [part_defects]
            grantees: {members: [acme]}
            purposes: [quality]
            valid: {from: 2026-01-01, until: 2027-01-01}
            columns:
              allow: [plant, defects]
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(policy), str(DECISIONS), order],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    growth = float(done.stdout.strip().splitlines()[-1])
    assert growth < ALLOWED_GROWTH_MB, f"{DECISIONS} decisions kept {growth:.1f} MB"


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
@pytest.mark.parametrize(
    ("first", "expected"),
    [("", "True"), ("import duckdb, pyarrow, grpc; ", "True"), ("import regopy; ", "False")],
)
def test_only_regopy_loaded_before_the_connector_is_noticed(first: str, expected: str) -> None:
    script = f"{first}import connector; print(connector.ONE_CPP_ALLOCATOR)"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == expected
