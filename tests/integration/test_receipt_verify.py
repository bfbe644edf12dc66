"""A peer keeps the receipt beside the result and proves, later, what it received and from whom."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from connector import jws
from connector.identity import create_dataspace_ca
from connector.receipt import ReceiptBundle
from tests.conftest import Space, run_cli

PURPOSE = "quality-benchmarking"


def keep(directory: Path, space: Space) -> tuple[Path, Path]:
    """A result saved as the exact Arrow bytes, with its receipt beside it."""
    result = directory / "defects.arrow"
    address = f"127.0.0.1:{space.server.port}"
    args: list[str | Path] = ["query", "--home", space.grantee.home, "--to", address]
    sql = "SELECT plant, sum(defects) AS d FROM part_defects GROUP BY plant"
    assert run_cli(*args, "--purpose", PURPOSE, "--format", "arrow", "--output", result, sql) == 0
    receipt = directory / "defects.arrow.receipt.json"
    assert receipt.exists()
    return result, receipt


@pytest.fixture
def kept(tmp_path: Path, shared_space: Space) -> tuple[Path, Path]:
    """A result of the module's server kept in this test's folder, with its receipt."""
    return keep(tmp_path, shared_space)


def _verify(space: Space, receipt: Path, *extra: str | Path) -> int:
    return run_cli("receipt", "verify", "--home", space.grantee.home, receipt, *extra)


def test_kept_receipt_and_data_verify(
    shared_space: Space, kept: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    result, receipt = kept
    capsys.readouterr()
    assert _verify(shared_space, receipt, "--data", result) == 0
    out = capsys.readouterr().out
    assert "valid (signature and data): 4 rows from carmaker to supplier-a" in out
    assert "quality-benchmark@1" in out


def test_changed_data_does_not_verify(
    shared_space: Space, kept: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    result, receipt = kept
    result.write_bytes(result.read_bytes()[:-9] + b"\x00" * 9)
    assert _verify(shared_space, receipt, "--data", result) == 1
    assert "does not match the receipt's digest" in capsys.readouterr().err


def test_changed_receipt_does_not_verify(
    shared_space: Space, kept: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, receipt = kept
    bundle = json.loads(receipt.read_text())
    head, body, sig = bundle["receipt_jws"].split(".")
    claim = json.loads(jws.b64url_decode(body))
    claim["rows"] = 4000
    bundle["receipt_jws"] = f"{head}.{jws.b64url(json.dumps(claim).encode())}.{sig}"
    receipt.write_text(json.dumps(bundle))
    assert _verify(shared_space, receipt) == 1
    assert "signature does not match" in capsys.readouterr().err


def test_receipt_key_not_endorsed_by_the_owners_certificate_is_refused(
    shared_space: Space, kept: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, receipt = kept
    bundle = ReceiptBundle.load(receipt)
    forged = jws.sign_es256(b'{"provider_id": "carmaker"}', ec.generate_private_key(ec.SECP256R1()))
    ReceiptBundle(bundle.receipt_jws, forged, bundle.provider_certificate_pem).save(receipt)
    assert _verify(shared_space, receipt) == 1
    assert "signature does not match" in capsys.readouterr().err


def test_certificate_from_another_ca_is_refused(
    tmp_path: Path, space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    _, receipt = keep(tmp_path, space)  # this test changes the grantee's CA: its own space
    create_dataspace_ca(tmp_path / "other", "other-space")
    (space.grantee.home / "tls" / "ca.pem").write_bytes(
        (tmp_path / "other" / "ca.pem").read_bytes()
    )
    assert _verify(space, receipt) == 1
    assert "not issued by your data space's CA" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_a_receipt_beside_any_format_verifies_with_only_the_ca(
    tmp_path: Path, shared_space: Space, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = tmp_path / f"defects.{fmt}"
    address = f"127.0.0.1:{shared_space.server.port}"
    args: list[str | Path] = ["query", "--home", shared_space.grantee.home, "--to", address]
    sql = "SELECT plant, sum(defects) AS d FROM part_defects GROUP BY plant"
    assert run_cli(*args, "--purpose", PURPOSE, "--format", fmt, "--output", result, sql) == 0
    receipt = result.with_name(result.name + ".receipt.json")
    ca = shared_space.grantee.home / "tls" / "ca.pem"
    capsys.readouterr()
    # No home: only the data shared_space's CA, as for an auditor who is no member.
    assert run_cli("receipt", "verify", receipt, "--ca", ca, "--data", result) == 0
    assert f"and defects.{fmt} as their {fmt}" in capsys.readouterr().out
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(result)
        pq.write_table(table.slice(1), result)  # one row taken out
    else:
        result.write_text(result.read_text().replace("Leipzig", "Leipzlg"))
    assert run_cli("receipt", "verify", receipt, "--ca", ca, "--data", result) == 1
    assert "was changed after it was saved" in capsys.readouterr().err


def test_numbers_in_json_output_are_numbers(
    shared_space: Space, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{shared_space.server.port}"
    args: list[str | Path] = ["query", "--home", shared_space.grantee.home, "--to", address]
    sql = "SELECT sum(defects) AS d, avg(defects) AS a, 1.5::DECIMAL(4,2) AS x FROM part_defects"
    assert run_cli(*args, "--purpose", PURPOSE, "--format", "json", sql) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert isinstance(row["d"], int) and isinstance(row["a"], float) and row["x"] == 1.5


def test_receipt_verify_without_ca_or_home_says_what_to_pass(
    tmp_path: Path,
    kept: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, receipt = kept
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CONNECTOR_HOME", raising=False)
    assert run_cli("receipt", "verify", receipt) == 1
    assert "connector.toml not found" in capsys.readouterr().err
