"""Errors on the wire: every exception class has a status code and an outcome, and the
reasons of a refusal arrive one by one, whatever they contain."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from connector import errors
from connector.server import RunningServer
from connector.status import error_from_status, reasons_metadata, status_of
from tests.conftest import Member, connect, policy_text, write_defects_csv

OUTCOMES = {
    "failed",
    "unauthenticated",
    "denied",
    "rejected",
    "exhausted",
    "timeout",
    "cancelled",
    "stalled",
    "expired",
    "abandoned",
    "too_large",
    "unavailable",
    "shutdown",
}


def _every_error_class() -> list[type[errors.ConnectorError]]:
    found, todo = [], [errors.ConnectorError]
    while todo:
        kind = todo.pop()
        found.append(kind)
        todo.extend(kind.__subclasses__())
    return found


@pytest.mark.parametrize("kind", _every_error_class(), ids=lambda k: k.__name__)
def test_every_error_class_has_a_status_code_and_an_outcome(
    kind: type[errors.ConnectorError],
) -> None:
    assert kind.status in grpc.StatusCode.__members__
    assert kind.outcome in OUTCOMES


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.PermissionDenied(["no"]), grpc.StatusCode.PERMISSION_DENIED),
        (errors.QueryRejected("bad", position=3), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ResourceExhausted("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.QueryTimeout("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.QueryCancelled("gone"), grpc.StatusCode.CANCELLED),
        (errors.NotAuthenticated("who"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.StoreBusy("busy"), grpc.StatusCode.UNAVAILABLE),
        (errors.StoreError("broken"), grpc.StatusCode.INTERNAL),
        (errors.PolicyEngineError("rego"), grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_status_codes_round_trip_to_the_same_kind(
    error: errors.ConnectorError, code: grpc.StatusCode
) -> None:
    assert status_of(error) is code
    back = error_from_status(code, error.message, reasons_metadata(error))
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
        assert isinstance(back, errors.PeerError)
    else:
        assert type(back) is (
            errors.PermissionDenied if isinstance(error, errors.PolicyEngineError) else type(error)
        )


def test_reasons_with_separators_in_them_stay_whole() -> None:
    reasons = ["a; b", "c;d", "e ; f; g", "ünïcode; ✓"]
    sent = reasons_metadata(errors.PermissionDenied(reasons))
    back = error_from_status(grpc.StatusCode.PERMISSION_DENIED, "ignored; text", sent)
    assert isinstance(back, errors.PermissionDenied)
    assert back.reasons == reasons


def test_two_refusal_reasons_arrive_as_two_over_mtls(
    tmp_path: Path,
    make_member: Callable[[str], Member],
    serve: Callable[[Member], RunningServer],
) -> None:
    provider, grantee = make_member("carmaker"), make_member("supplier-a")
    csv = write_defects_csv(tmp_path / "d.csv")
    provider.ingest(csv, "part_defects")
    provider.ingest(csv, "other_defects")
    # Two datasets, each granted by two policies that shape it differently: two reasons,
    # and each reason's own text holds "; ".
    for dataset in ("part_defects", "other_defects"):
        provider.write_policy(
            f"{dataset}-clear.yaml",
            policy_text(f"{dataset}-clear", members="[supplier-a]", datasets=f"[{dataset}]"),
        )
        provider.write_policy(
            f"{dataset}-masked.yaml",
            policy_text(
                f"{dataset}-masked",
                members="[supplier-a]",
                datasets=f"[{dataset}]",
                columns="[plant]",
            )
            + "  mask: {part_no: hash}\n",
        )
    server = serve(provider)
    with connect(server, grantee) as peer, pytest.raises(errors.PermissionDenied) as refused:
        peer.query(
            "SELECT a.plant FROM part_defects a JOIN other_defects b USING (plant)",
            "quality-benchmarking",
        )
    assert len(refused.value.reasons) == 2, refused.value.reasons
    assert all("; " in reason for reason in refused.value.reasons)
