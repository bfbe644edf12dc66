"""The federation plan: what every member is asked and how the answers combine; the exact
combination of the members' partial answers by it (federated_sql writes the plan)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

UNION = "union"
AGGREGATE = "aggregate"
MEMBER_COLUMN = "_member"
COMBINED_FUNCTIONS = frozenset({"count", "sum", "min", "max", "avg"})


@dataclass(frozen=True)
class AggregatePart:
    """One output aggregate: its name, how it combines, and the partial columns it reads."""

    output: str
    function: str  # count | sum | min | max | avg
    partials: tuple[str, ...]  # avg: (sum column, count column)


@dataclass(frozen=True)
class FederationPlan:
    """What every member is asked and how their answers combine."""

    kind: str  # UNION or AGGREGATE
    member_sql: str
    datasets: tuple[str, ...] = ()
    groups: tuple[tuple[str, str], ...] = ()  # (output name or "", partial column)
    aggregates: tuple[AggregatePart, ...] = ()
    outputs: tuple[str, ...] = ()  # output names in select order
    order_by: tuple[tuple[str, bool], ...] = ()  # (output name, descending)
    limit: int | None = None
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON (kept with the receipts, so a combination can be checked again)."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> FederationPlan:
        """The plan to_json wrote; ValueError when it is not one. The file it comes from is
        not trusted: every part that reaches the combining SQL is checked or quoted."""
        try:
            plan = cls(
                kind=str(raw["kind"]),
                member_sql=str(raw["member_sql"]),
                datasets=tuple(map(str, raw["datasets"])),
                groups=tuple((str(a), str(b)) for a, b in raw["groups"]),
                aggregates=tuple(
                    AggregatePart(
                        str(a["output"]), str(a["function"]), tuple(map(str, a["partials"]))
                    )
                    for a in raw["aggregates"]
                ),
                outputs=tuple(map(str, raw["outputs"])),
                order_by=tuple((str(a), bool(b)) for a, b in raw["order_by"]),
                limit=None if raw["limit"] is None else int(raw["limit"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a federation plan ({exc})") from None
        functions = {part.function for part in plan.aggregates}
        if plan.kind not in (UNION, AGGREGATE) or not functions <= COMBINED_FUNCTIONS:
            raise ValueError("not a federation plan (unknown kind or combining function)")
        if plan.limit is not None and plan.limit < 0:
            raise ValueError("not a federation plan (negative limit)")
        if any(len(p.partials) != (2 if p.function == "avg" else 1) for p in plan.aggregates):
            raise ValueError("not a federation plan (partial columns do not fit)")
        if set(plan.outputs) - {o for o, _ in plan.groups} - {p.output for p in plan.aggregates}:
            raise ValueError("not a federation plan (an output is neither group nor aggregate)")
        return plan


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def combine_sql(plan: FederationPlan, relation: str) -> str:
    """The SQL that combines the partial answers stacked in relation into the answer."""
    by_output: dict[str, str] = {}
    for output, column in plan.groups:
        if output:
            by_output[output] = _quoted(column)
    for part in plan.aggregates:
        a, *rest = (_quoted(c) for c in part.partials)
        if part.function == "avg":
            by_output[part.output] = f"CAST(sum({a}) AS DOUBLE) / CAST(sum({rest[0]}) AS DOUBLE)"
        elif part.function == "count":
            by_output[part.output] = f"CAST(coalesce(sum({a}), 0) AS BIGINT)"
        else:
            by_output[part.output] = f"{part.function}({a})"
    columns = ", ".join(f"{by_output[o]} AS {_quoted(o)}" for o in plan.outputs)
    group = ", ".join(_quoted(c) for _, c in plan.groups)
    # Only names quoted here and the plan's own partial columns: no member's text is SQL.
    text = f"SELECT {columns} FROM {relation}"  # noqa: S608
    if plan.groups:
        text += f" GROUP BY {group}"
    order = [f"{_quoted(o)} {'DESC' if d else 'ASC'}" for o, d in plan.order_by]
    if not order:
        # Deterministic, so that a combination can be computed again and compared.
        order = [f"{_quoted(c)} ASC NULLS LAST" for _, c in plan.groups]
    if order:
        text += " ORDER BY " + ", ".join(order)
    if plan.limit is not None:
        text += f" LIMIT {plan.limit}"
    return text


@functools.cache
def _combining_database() -> duckdb.DuckDBPyConnection:
    """The process's in-memory database for combining answers (no file access).

    Opening a DuckDB database costs about 25 ms of CPU; each combination (and each receipt
    check that computes one again) works through a connection of its own, whose registered
    answers no other connection sees.
    """
    return duckdb.connect(":memory:", config={"enable_external_access": False})


def combine(plan: FederationPlan, partials: list[pa.Table]) -> pa.Table:
    """The combined answer from the members' partial answers (in the plan's form)."""
    stacked = (
        pa.concat_tables(partials, promote_options="permissive")
        if partials
        else _empty_partials(plan)
    )
    connection = _combining_database().cursor()
    try:
        connection.register("fed_partials", stacked)
        return connection.sql(combine_sql(plan, "fed_partials")).to_arrow_table()
    finally:
        connection.close()


def _empty_partials(plan: FederationPlan) -> pa.Table:
    names = [c for _, c in plan.groups] + [c for p in plan.aggregates for c in p.partials]
    return pa.table({name: pa.array([], pa.int64()) for name in names})


def group_keys(plan: FederationPlan, table: pa.Table) -> list[tuple[object, ...]]:
    """The group of every row of a partial answer, as a tuple of its group values."""
    columns = [table.column(c).to_pylist() for _, c in plan.groups]
    return list(zip(*columns, strict=True)) if columns else [() for _ in range(table.num_rows)]
