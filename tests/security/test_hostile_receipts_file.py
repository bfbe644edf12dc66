"""A federated receipts file is hostile input to `connector receipt verify`: its plan may not
smuggle SQL into the recombination, and its parts may not name files elsewhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from connector.federated_sql import plan_federation
from tests.conftest import run_cli

SQL = "SELECT plant, sum(defects) AS s FROM part_defects GROUP BY plant"
PLAN = plan_federation(SQL)


def document(plan: dict[str, Any], members: list[Any]) -> dict[str, Any]:
    return {"format": 2, "kind": "aggregate", "sql": SQL, "result": "r.csv",
            "data_format": "csv", "plan": plan, "members": members,
            "incomplete_groups": []}  # fmt: skip


def smuggled_function() -> dict[str, Any]:
    plan = PLAN.to_json()
    plan["aggregates"][0]["function"] = "(SELECT 42) + sum"
    return plan


def receipt_entry(part: str) -> dict[str, Any]:
    receipt = {"receipt_jws": "a.b.c", "endorsement": "x", "provider_certificate_pem": "y"}
    return {"member": "m", "outcome": "answered", "part": part, "receipt": receipt}


@pytest.mark.parametrize(
    "content",
    [
        document(smuggled_function(), []),
        document({**PLAN.to_json(), "limit": -1}, []),
        document({**PLAN.to_json(), "kind": "drop"}, []),
        document({**PLAN.to_json(), "outputs": ["s", 'x"; DROP']}, []),
        document(PLAN.to_json(), [receipt_entry("../../etc/passwd")]),
        document(PLAN.to_json(), [receipt_entry("p.arrow") | {"receipt": {"evil": 1}}]),
        document(PLAN.to_json(), ["not an object"]),
        {"plan": "nothing"},
        {**document(PLAN.to_json(), []), "format": 1},  # the plan was trusted as written
        {**document(PLAN.to_json(), []), "sql": "SELECT 1; DROP TABLE x"},
        # Nesting the parser must never see (the pre-scan refuses it first).
        {**document(PLAN.to_json(), []), "sql": "SELECT " + "(" * 50_000 + "1" + ")" * 50_000},
        [],
    ],
)
def test_a_hostile_receipts_file_is_refused_with_a_message(
    content: object, tmp_path: Path, dataspace: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    receipts = tmp_path / "r.csv.receipts.json"
    receipts.write_text(json.dumps(content))
    # What the recombination of no answers would write: were the plan trusted, it would run.
    (tmp_path / "r.csv").write_text('"plant","s"\n')
    args: list[str | Path] = ["receipt", "verify", receipts, "--data", tmp_path / "r.csv"]
    assert run_cli(*args, "--ca", dataspace / "ca.pem") == 1
    err = capsys.readouterr().err
    assert "NOT VALID" in err and "Traceback" not in err
