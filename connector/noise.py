"""Differential privacy on aggregate-only datasets, and the owner's declared grouping sets.

Under a policy's `noise` term a query may return only grouping columns and bare count(*),
count(col), sum(col) and avg(col) (of columns the policy bounds). The query DuckDB runs
returns the grouping columns and the raw measurements (count(*), count(col), sum(col) of
the clamped column) under names chosen here; each answer row then gets Laplace noise from
OpenDP's vetted samplers (discrete over integers), epsilon / m for each of the query's m
measurements. Groups are disjoint, so each group spends that share once (parallel
composition) and the whole query spends epsilon, which the daily budget counts.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal, Protocol

import duckdb
import pyarrow as pa

from connector import querytree, sqltree
from connector.errors import PermissionDenied, QueryRejected, ResourceExhausted
from connector.shaping import Noise, Shaping
from connector.sqljson import query_sql, serialised_query
from connector.sqltext import quote_identifier
from connector.store import ColumnInfo

INTEGER_TYPES = frozenset(
    "TINYINT SMALLINT INTEGER BIGINT HUGEINT UTINYINT USMALLINT UINTEGER UBIGINT UHUGEINT".split()
)
MICRO = 1_000_000  # the budget ledger counts whole micro-epsilons: exact under concurrency
INT64 = (-(2**63), 2**63 - 1)
_NOISY_FUNCTIONS = {"count_star": "count", "count": "count", "sum": "sum", "avg": "avg"}
_NOISY_FUNCTIONS["mean"] = "avg"
_ROW_NAME = {"count_star": "count_star()"}  # DuckDB's own name for an unaliased count(*)


def micro_epsilon(epsilon: float) -> int:
    """epsilon in whole micro-epsilons, rounded up (a query never costs less than its term)."""
    return math.ceil(round(epsilon * MICRO, 3))


class NoisyRelation(Protocol):
    """What the noise and grouping rules need of an enforced relation (see enforce.Relation)."""

    @property
    def dataset(self) -> str: ...
    @property
    def columns(self) -> tuple[ColumnInfo, ...]: ...
    @property
    def shaping(self) -> Shaping: ...
    @property
    def clamps(self) -> Mapping[str, tuple[int | float, int | float]]: ...


@dataclass(frozen=True)
class Measurement:
    """One raw aggregate the noisy query measures: `count(*)`, `count(col)` or `sum(col)`."""

    alias: str  # its column in the query DuckDB runs
    text: str  # as the peer reads it
    sql: str
    sensitivity: int | float  # how much one row can change it
    integer: bool  # discrete Laplace over integers (else Laplace over doubles)


@dataclass(frozen=True)
class Output:
    """One column of the answer, in the peer's order and under the peer's name."""

    name: str
    kind: Literal["group", "count", "sum", "avg"]
    source: str  # the group's or the measurement's alias
    denominator: str = ""  # avg: the alias of count(col)


@dataclass(frozen=True)
class NoisePlan:
    """How one query is answered under noise: what DuckDB runs, what is noised, and how."""

    noise: Noise
    sql: str  # the measurements query, before the HAVING count(*) >= K rewrite
    measurements: tuple[Measurement, ...]
    outputs: tuple[Output, ...]

    @property
    def epsilon_each(self) -> float:
        """The epsilon each measurement spends (epsilon / m)."""
        return self.noise.epsilon / max(1, len(self.measurements))

    def scale(self, measurement: Measurement) -> float:
        """The Laplace scale of one measurement: sensitivity / (epsilon / m)."""
        return float(measurement.sensitivity) / self.epsilon_each

    def mechanisms(self) -> tuple[str, ...]:
        """One line a measurement, as Explain shows them."""
        return tuple(
            f"{m.text}: {'discrete ' if m.integer else ''}Laplace noise, scale "
            f"{self.scale(m):.6g} (sensitivity {m.sensitivity:g}, epsilon {self.epsilon_each:.6g})"
            for m in self.measurements
        )

    def schema(self, measured: pa.Schema) -> pa.Schema:
        """The schema of the answer, from the schema of the measurements query."""
        fields = []
        for output in self.outputs:
            if output.kind == "group":
                kind = measured.field(output.source).type
            elif output.kind == "avg" or not self._measurement(output.source).integer:
                kind = pa.float64()
            else:
                kind = pa.int64()
            fields.append(pa.field(output.name, kind))
        return pa.schema(fields, metadata=measured.metadata)

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The answer rows for one batch of measurements: every measurement noised once."""
        noisy = {
            m.alias: self._noised(m, batch.column(m.alias).to_pylist()) for m in self.measurements
        }
        columns: list[pa.Array] = []
        for output in self.outputs:
            if output.kind == "group":
                columns.append(batch.column(output.source))
            elif output.kind == "avg":
                sums, counts = noisy[output.source], noisy[output.denominator]
                values = [float(s) / max(1.0, float(c)) for s, c in zip(sums, counts, strict=True)]
                columns.append(pa.array(values, pa.float64()))
            else:
                measurement = self._measurement(output.source)
                kind = pa.int64() if measurement.integer else pa.float64()
                columns.append(pa.array(noisy[output.source], kind))
        return pa.RecordBatch.from_arrays(columns, schema=self.schema(batch.schema))

    def _measurement(self, alias: str) -> Measurement:
        return next(m for m in self.measurements if m.alias == alias)

    def _noised(self, measurement: Measurement, values: list[Any]) -> list[Any]:
        if not values:
            return []
        # A sum over no value is 0 here, never NULL: a NULL would tell exactly that a group
        # holds no value of the column.
        if measurement.integer:
            exact = [int(v) if v is not None else 0 for v in values]
            if any(not INT64[0] <= v <= INT64[1] for v in exact):
                raise ResourceExhausted(
                    f"{measurement.text} is too large to answer with noise; group more finely"
                )
            sampler = _sampler(True, measurement.sensitivity, self.epsilon_each)
            return [max(INT64[0], min(INT64[1], int(v))) for v in sampler(exact)]
        floats = [float(v) if v is not None else 0.0 for v in values]
        sampler = _sampler(False, measurement.sensitivity, self.epsilon_each)
        return [float(v) for v in sampler(floats)]


def load_mechanisms() -> None:
    """Load OpenDP now: a server calls this before it limits its address space, so that the
    first noisy query does not map OpenDP's library under the limit (commands that never add
    noise skip its 0.2 s import). Only the modules the sampler uses: opendp.prelude would
    also load OpenDP's extras (scikit-learn, numpy and polars helpers)."""
    import opendp.measurements  # noqa: F401


@cache
def _sampler(
    integer: bool, sensitivity: int | float, epsilon: float
) -> Callable[[list[Any]], list[Any]]:
    """OpenDP's vetted vector Laplace mechanism (discrete over 64-bit integers), calibrated
    so that one row's change costs at most epsilon, as OpenDP's own privacy map confirms."""
    from opendp import domains, measurements, metrics, mod  # loaded by load_mechanisms()

    mod.enable_features("contrib")  # OpenDP's label for these measurements (idempotent)
    d_in: int | float
    if integer:
        domain = domains.vector_domain(domains.atom_domain(T="i64"))
        space, d_in = (domain, metrics.l1_distance(T="i64")), int(sensitivity)
    else:
        domain = domains.vector_domain(domains.atom_domain(T=float, nan=False))
        space, d_in = (domain, metrics.l1_distance(T=float)), float(sensitivity)
    mechanism = measurements.make_laplace(*space, scale=float(sensitivity) / epsilon)
    loss = float(mechanism.map(d_in))  # type: ignore[no-untyped-call]
    if loss > epsilon * (1 + 1e-9):
        raise PermissionDenied(["the noise for this query could not be calibrated; ask the owner"])
    sample: Callable[[list[Any]], list[Any]] = mechanism
    return sample


@dataclass(frozen=True)
class BudgetStatus:
    """A member's privacy budget under the policies that noise a dataset, today."""

    epsilon_per_day: float
    remaining: float
    resets_at: dt.datetime


@dataclass(frozen=True)
class PrivacyCharge:
    """What one noisy query costs under one policy, in micro-epsilons."""

    policy_id: str
    cost: int
    per_day: int


def charges(noise: Noise, policy_ids: Sequence[str]) -> tuple[PrivacyCharge, ...]:
    """The charge of one query under each policy that grants the noised dataset."""
    cost, daily = micro_epsilon(noise.epsilon), micro_epsilon(noise.epsilon_per_day)
    return tuple(PrivacyCharge(p, cost, daily) for p in policy_ids)


# --- reading the peer's query (through sqltree's accessors: the AST is hostile input) ---


def grouping_form(sql: str, relation: NoisyRelation) -> str:
    """sql as the aggregate-only check should see it: QueryRejected when its GROUP BY is not
    a declared grouping set or (under noise) it asks for anything but noisy aggregates;
    under noise, the measurements query."""
    plan = noise_plan(sql, relation)
    return plan.sql if plan is not None else sql


def noise_plan(sql: str, relation: NoisyRelation) -> NoisePlan | None:
    """The plan of a query on a relation with declared groupings or noise (None without
    noise); QueryRejected names the rule a query breaks."""
    shaping = relation.shaping
    if shaping.noise is None and not shaping.group_by:
        return None
    document = serialised_query(sql)
    node = querytree.statement_node(document)
    if querytree.query_type(node) != "SELECT_NODE":
        raise _refused(relation, "UNION, INTERSECT and EXCEPT are not allowed")
    groups = _group_names(node, relation)
    if shaping.noise is None:
        return None
    return _Planner(relation, shaping.noise, groups).plan(document, node)


def _refused(relation: NoisyRelation, detail: str) -> QueryRejected:
    return QueryRejected(f"{detail}; {form_help(relation)}")


def form_help(relation: NoisyRelation) -> str:
    """How to write a query on this relation, for its noise and grouping terms."""
    shaping = relation.shaping
    parts = []
    if shaping.noise is not None:
        bounded = ", ".join(sorted(relation.clamps)) or "none"
        parts.append(
            f"dataset {relation.dataset} answers with noise: select grouping columns and bare "
            f"count(*), count(col), sum(col) or avg(col) (sum and avg of bounded columns: "
            f"{bounded}), each optionally AS name; ORDER BY grouping columns and LIMIT are fine"
        )
    if shaping.group_by:
        sets = ", ".join(f"({', '.join(g)})" for g in shaping.group_by)
        parts.append(f"GROUP BY must be one of the declared sets {sets}")
    return "; ".join(parts)


def _column(expression: object) -> str | None:
    """The last part of a column name (plant of t.plant), lower-cased; None for anything
    that is not a column named by name."""
    if not sqltree.is_expression(expression):
        return None
    reference = sqltree.column_reference(expression)
    if reference is None or reference.kind is not sqltree.ReferenceKind.NAME:
        return None
    return reference.names[-1] if reference.names else None


def _group_names(node: dict[str, Any], relation: NoisyRelation) -> tuple[str, ...]:
    """The GROUP BY columns, checked against the declared sets."""
    expressions = querytree.group_expressions(node)
    names = tuple(_column(e) for e in expressions)
    if querytree.aggregate_handling(node) != "STANDARD_HANDLING" or None in names:
        raise _refused(relation, "GROUP BY may list only granted columns by name")
    if expressions and (querytree.group_sets(node) or [[]]) != [list(range(len(names)))]:
        raise _refused(relation, "GROUPING SETS, ROLLUP and CUBE are not allowed")
    groups = tuple(str(n) for n in names)
    declared = relation.shaping.group_by
    if declared and not any(set(groups) == set(g) for g in declared):
        written = f"({', '.join(groups)})" if groups else "no GROUP BY"
        raise _refused(relation, f"{written} is not a grouping the owner declared")
    return groups


class _Planner:
    """Builds the measurements query and the answer's columns from the peer's select list."""

    def __init__(self, relation: NoisyRelation, noise: Noise, groups: tuple[str, ...]) -> None:
        self.relation = relation
        self.noise = noise
        self.groups = groups
        self.types = {c.name: c.type.split("(", maxsplit=1)[0] for c in relation.columns}
        self.measurements: dict[str, Measurement] = {}
        self.group_aliases: dict[str, str] = {}

    def fail(self, detail: str) -> QueryRejected:
        return _refused(self.relation, detail)

    def plan(self, document: dict[str, Any], node: dict[str, Any]) -> NoisePlan:
        if querytree.having_clause(node) is not None:
            raise self.fail("HAVING is not allowed under noise (it would test exact aggregates)")
        outputs = tuple(self._output(item) for item in querytree.select_list(node))
        if not outputs:
            raise self.fail("the select list is empty")
        aggregate_names = {o.name.lower() for o in outputs if o.kind != "group"}
        self._modifiers(querytree.query_modifiers(node), aggregate_names)
        # The aliases hold '-', which no granted column name can: an ORDER BY a grouping
        # column never binds to a measurement instead.
        select = [
            f"{quote_identifier(g)} AS {quote_identifier(a)}" for g, a in self.group_aliases.items()
        ] + [f"{m.sql} AS {quote_identifier(m.alias)}" for m in self.measurements.values()]
        template = querytree.statement_node(serialised_query(f"SELECT {', '.join(select)}"))
        node["select_list"] = list(querytree.select_list(template))
        try:
            rewritten = query_sql(document)
        except duckdb.Error:
            raise self.fail("the query could not be put in the noisy form") from None
        return NoisePlan(self.noise, rewritten, tuple(self.measurements.values()), outputs)

    def _output(self, item: dict[str, Any]) -> Output:
        column = _column(item)
        if column is not None:
            if column not in self.groups:
                raise self.fail(f"column {column} in the select list must be grouped")
            alias = self.group_aliases.setdefault(column, f"g-{len(self.group_aliases)}")
            return Output(sqltree.expression_alias(item) or column, "group", alias)
        if sqltree.expression_class(item) != "FUNCTION":
            raise self.fail(
                "under noise the select list may hold only grouping columns and bare "
                "count, sum and avg: compute expressions over them on your side"
            )
        written = sqltree.function_name(item)
        kind = _NOISY_FUNCTIONS.get(written)
        if kind is None:
            raise self.fail(
                f"{written}() is not allowed under noise: only count, sum and avg get calibrated "
                "noise (min, max and other aggregates would show exact values)"
            )
        if sqltree.function_has_filter_or_order(item):
            raise self.fail("FILTER and ORDER BY inside an aggregate are not allowed")
        if sqltree.function_is_distinct(item) or sqltree.function_exports_state(item):
            raise self.fail(f"{written}(DISTINCT ...) is not allowed under noise")
        arguments = sqltree.function_arguments(item)
        if written == "count_star" and not arguments:
            count = self._measure("count(*)", "count(*)", 1, integer=True)
            return Output(sqltree.expression_alias(item) or _ROW_NAME[written], "count", count)
        column = _column(arguments[0]) if len(arguments) == 1 else None
        if column is None or column not in self.types:
            raise self.fail(f"{written}() must read one granted column by name")
        name = sqltree.expression_alias(item) or f"{written}({column})"
        summed = self._sum(column, written) if kind in ("sum", "avg") else ""
        if kind == "sum":
            return Output(name, "sum", summed)
        counted = self._measure(f"count({column})", f"count({quote_identifier(column)})", 1, True)
        if kind == "count":
            return Output(name, "count", counted)
        return Output(name, "avg", summed, counted)

    def _sum(self, column: str, written: str) -> str:
        if column not in self.relation.clamps:
            raise self.fail(
                f"{written}({column}) needs bounds for {column} in the policy's noise terms "
                "(ask the owner)"
            )
        low, high = self.relation.clamps[column]
        integer = self.types[column] in INTEGER_TYPES
        sensitivity = max(abs(low), abs(high))
        return self._measure(
            f"sum({column})", f"sum({quote_identifier(column)})", sensitivity, integer
        )

    def _measure(self, text: str, sql: str, sensitivity: int | float, integer: bool) -> str:
        found = self.measurements.get(text)
        if found is None:
            alias = f"m-{len(self.measurements)}"
            found = self.measurements[text] = Measurement(alias, text, sql, sensitivity, integer)
        return found.alias

    def _modifiers(
        self, modifiers: list[querytree.QueryModifier], aggregate_names: set[str]
    ) -> None:
        for modifier in modifiers:
            kind = modifier.kind
            if kind == "LIMIT_MODIFIER":
                continue  # constants only: the aggregate-only check refuses anything else
            if kind != "ORDER_MODIFIER":
                raise self.fail("only ORDER BY and LIMIT may follow the query under noise")
            for order in modifier.orders:
                column = _column(order.expression)
                if column is None or column in aggregate_names or column not in self.groups:
                    raise self.fail(
                        "ORDER BY may name only grouping columns under noise (an order by an "
                        "aggregate would follow its exact value)"
                    )
