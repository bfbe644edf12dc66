"""A member's answer is hostile input to the combination: what was not asked is left out
with a reason, never combined and never a traceback."""

from __future__ import annotations

import pyarrow as pa
import pytest

from connector.errors import PeerError
from connector.federated_answers import MemberReport, check_answer_shape, combined_or_refused, union
from connector.federated_sql import plan_federation

PLAN = plan_federation("SELECT plant, sum(defects) AS s, min(week) AS w FROM d GROUP BY plant")


def test_a_partial_answer_must_have_exactly_the_partial_columns() -> None:
    good = pa.table({"fed_g0": ["a"], "fed_p1": [1], "fed_p2": ["2026-01-05"]})
    check_answer_shape(PLAN, good, "m:1")
    for bad, words in (
        (good.drop_columns(["fed_p2"]), "did not answer the partial aggregates"),
        (good.rename_columns(["fed_g0", "fed_p2", "fed_p1"]), "did not answer the partial"),
        (good.set_column(1, "fed_p1", pa.array(["1"])), "fed_p1 as string, not as a number"),
        (pa.table({"_member": ["sup-x"], "plant": ["a"]}), "column named _member"),
    ):
        with pytest.raises(PeerError, match=words):
            check_answer_shape(PLAN, bad, "m:1")


def test_partials_that_do_not_combine_are_refused_with_the_members_named() -> None:
    one = pa.table({"fed_g0": ["a"], "fed_p1": [1], "fed_p2": [3]})
    other = pa.table({"fed_g0": [7], "fed_p1": [2], "fed_p2": ["x"]})
    answered = [(MemberReport("m1", "", ""), one), (MemberReport("m2", "", ""), other)]
    with pytest.raises(PeerError, match="partial answers of m1, m2 could not be combined"):
        combined_or_refused(PLAN, answered)
    with pytest.raises(pa.ArrowException):
        union(answered)  # the caller turns this into a PeerError naming the cause
