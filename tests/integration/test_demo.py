"""`make demo` keeps working: the example data space runs end to end and cleans up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--workdir", str(tmp_path / "space")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "ppm" in out and "4 rows from northwind-motors" in out
    assert "4 rows over Arrow Flight SQL" in out
    assert "purpose marketing is not allowed" in out
    assert "column unit_price_eur of dataset part_defects is not allowed" in out
    assert "no policy grants dataset deliveries to you" in out
    assert "HAVING (count_star() >= 20)" in out and "hmac_sha256(<connector mask key>" in out
    assert "15 rows from northwind-motors" in out  # groups under 20 inspections dropped
    assert "dataset part_defects is aggregate-only" in out
    assert "intact:" in out and "signed checkpoints" in out
    assert "7 passed, 0 failed" in out and "3 passed, 0 failed" in out
    assert "directory version 1 of open-manufacturing: 4 members" in out
    assert (
        "axle-works (127.0.0.1:" in out and "refused: no policy grants dataset plant_energy" in out
    )
    assert "INCOMPLETE: 2 of 3 members answered (aggregate)" in out
    assert "energy.csv as their aggregate): 2 receipts" in out
    assert "All connectors stopped" in out
