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


@pytest.fixture
def kept(tmp_path: Path, space: Space) -> tuple[Path, Path]:
    """A result saved as the exact Arrow bytes, with its receipt beside it."""
    result = tmp_path / "defects.arrow"
    args = ["query", "--home", space.grantee.home, "--to", f"127.0.0.1:{space.server.port}"]
    sql = "SELECT plant, sum(defects) AS d FROM part_defects GROUP BY plant"
    assert run_cli(*args, "--purpose", PURPOSE, "--format", "arrow", "--output", result, sql) == 0
    receipt = tmp_path / "defects.arrow.receipt.json"
    assert receipt.exists()
    return result, receipt


def _verify(space: Space, receipt: Path, *extra: str | Path) -> int:
    return run_cli("receipt", "verify", "--home", space.grantee.home, receipt, *extra)


def test_kept_receipt_and_data_verify(
    space: Space, kept: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    result, receipt = kept
    capsys.readouterr()
    assert _verify(space, receipt, "--data", result) == 0
    out = capsys.readouterr().out
    assert "valid (signature and data): 4 rows from carmaker to supplier-a" in out
    assert "quality-benchmark@1" in out


def test_changed_data_does_not_verify(
    space: Space, kept: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    result, receipt = kept
    result.write_bytes(result.read_bytes()[:-9] + b"\x00" * 9)
    assert _verify(space, receipt, "--data", result) == 1
    assert "does not match the receipt's digest" in capsys.readouterr().err


def test_changed_receipt_does_not_verify(
    space: Space, kept: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, receipt = kept
    bundle = json.loads(receipt.read_text())
    head, body, sig = bundle["receipt_jws"].split(".")
    claim = json.loads(jws.b64url_decode(body))
    claim["rows"] = 4000
    bundle["receipt_jws"] = f"{head}.{jws.b64url(json.dumps(claim).encode())}.{sig}"
    receipt.write_text(json.dumps(bundle))
    assert _verify(space, receipt) == 1
    assert "signature does not match" in capsys.readouterr().err


def test_receipt_key_not_endorsed_by_the_owners_certificate_is_refused(
    space: Space, kept: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, receipt = kept
    bundle = ReceiptBundle.load(receipt)
    forged = jws.sign_es256(b'{"provider_id": "carmaker"}', ec.generate_private_key(ec.SECP256R1()))
    ReceiptBundle(bundle.receipt_jws, forged, bundle.provider_certificate_pem).save(receipt)
    assert _verify(space, receipt) == 1
    assert "signature does not match" in capsys.readouterr().err


def test_certificate_from_another_ca_is_refused(
    tmp_path: Path, space: Space, kept: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, receipt = kept
    create_dataspace_ca(tmp_path / "other", "other-space")
    (space.grantee.home / "tls" / "ca.pem").write_bytes(
        (tmp_path / "other" / "ca.pem").read_bytes()
    )
    assert _verify(space, receipt) == 1
    assert "not issued by your data space's CA" in capsys.readouterr().err
