"""The aggregate-only form: check that a query only aggregates, then add the group minimum.

On an aggregate-only dataset a query is one SELECT over that dataset alone, grouped by plain
granted columns, returning group columns and allowed aggregates of plain columns (and
expressions over those). WHERE may name only grouping columns, so every group is a whole
group of the shaped dataset, never a hand-picked part of one. The query is then rewritten to
keep only groups of at least K rows (`HAVING ... AND count(*) >= K`); the sandbox checks the
bound plan for the same form, so either layer alone stops raw rows and small groups.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import duckdb

from connector import querytree, sqltree
from connector.errors import QueryRejected
from connector.noise import NoisyRelation, grouping_form
from connector.sqlallowed import AGGREGATE_FUNCTIONS, WINDOW_FUNCTIONS
from connector.sqljson import query_sql, serialised_query

# The aggregates an aggregate-only dataset answers (plan names; the peer may also write avg
# as mean). Each reads one column; min and max only measurement columns (see enforce.py).
AGGREGATE_ONLY_FUNCTIONS = frozenset(
    "count count_star sum avg mean min max stddev stddev_samp stddev_pop variance var_samp "
    "var_pop".split()
)
EXTREMUM_FUNCTIONS = frozenset({"min", "max"})

# DuckDB types whose min and max are measurements, not identifiers or free text.
MEASUREMENT_TYPES = frozenset(
    "TINYINT SMALLINT INTEGER BIGINT HUGEINT UTINYINT USMALLINT UINTEGER UBIGINT UHUGEINT "
    "FLOAT DOUBLE DECIMAL DATE TIME TIMESTAMP TIMESTAMP_S TIMESTAMP_MS TIMESTAMP_NS".split()
) | {"TIMESTAMP WITH TIME ZONE"}


def is_measurement_type(type_name: str) -> bool:
    """True for numbers, dates and times (DECIMAL with or without its precision)."""
    return type_name.split("(", maxsplit=1)[0] in MEASUREMENT_TYPES


FORM = (
    "dataset {dataset} is aggregate-only: write SELECT <grouping columns>, <aggregates> FROM "
    "{dataset} [WHERE <conditions on grouping columns>] GROUP BY <columns>; aggregates are "
    "count, sum, avg, min, max, stddev and variance of one column (min and max of number or "
    "date columns only); groups of fewer than {k} rows are not returned"
)


def aggregate_form_help(dataset: str, min_group_size: int) -> str:
    """How to write a query on an aggregate-only dataset."""
    return FORM.format(dataset=dataset, k=min_group_size)


_REFUSED_OUTPUTS = {
    "SUBQUERY": "subqueries",
    "WINDOW": "window functions",
}


@dataclass(frozen=True)
class AggregateTerms:
    """What the aggregate-only check needs to know of one relation."""

    dataset: str
    columns: frozenset[str]
    measurement_columns: frozenset[str]  # the columns min and max may read
    min_group_size: int


def aggregate_only_query(sql: str, terms: AggregateTerms) -> str:
    """The query with `count(*) >= K` added to its HAVING; QueryRejected unless it is in
    the aggregate-only form."""
    document = serialised_query(sql)
    node = querytree.statement_node(document)
    try:
        _FormCheck(terms).select(node)
    except RecursionError:
        raise QueryRejected("the query is nested too deeply") from None
    node["having"] = _with_minimum(querytree.having_clause(node), terms.min_group_size)
    try:
        return query_sql(document)
    except duckdb.Error:
        raise QueryRejected("the query could not be put in the aggregate-only form") from None


def _with_minimum(having: Any, minimum: int) -> dict[str, Any]:
    condition: dict[str, Any] = json.loads(_minimum_condition(having is not None, int(minimum)))
    if having is not None:
        condition["children"][0] = having
    return condition


@functools.lru_cache(maxsize=64)
def _minimum_condition(and_having: bool, minimum: int) -> str:
    """The serialised `count(*) >= K` condition (after `TRUE AND` when the query has a
    HAVING of its own), parsed once per K: a parse costs about 0.6 ms on every query."""
    template = (
        "SELECT 1 HAVING TRUE AND count(*) >= {k}"
        if and_having
        else "SELECT 1 HAVING count(*) >= {k}"
    )
    node = querytree.statement_node(serialised_query(template.format(k=minimum)))
    return json.dumps(querytree.having_clause(node))


class _FormCheck:
    """Refuses any part of a SELECT node outside the aggregate-only form."""

    def __init__(self, terms: AggregateTerms) -> None:
        self.terms = terms
        self.help = aggregate_form_help(terms.dataset, terms.min_group_size)
        self.groups: frozenset[str] = frozenset()
        self.qualifiers = frozenset({terms.dataset})

    def fail(self, detail: str) -> QueryRejected:
        return QueryRejected(f"{detail}; {self.help}")

    def select(self, node: dict[str, Any]) -> None:
        if querytree.query_type(node) != "SELECT_NODE":
            raise self.fail("UNION, INTERSECT and EXCEPT are not allowed")
        if querytree.cte_entries(node):
            raise self.fail("WITH is not allowed")
        if querytree.qualify_clause(node) is not None or querytree.has_sample(node):
            raise self.fail("QUALIFY and samples are not allowed")
        source = querytree.from_item(node)
        self._from(source if isinstance(source, dict) else {})
        self.groups = self._groups(node)
        aliases = set()
        for item in querytree.select_list(node):
            self._output(item, "the select list")
            if sqltree.expression_alias(item):
                aliases.add(sqltree.expression_alias(item).lower())
        self._where(querytree.where_clause(node))
        having = querytree.having_clause(node)
        if having is not None:
            self._output(having, "HAVING")
        # ORDER BY, DISTINCT ON and LIMIT: the same rule as the select list.
        for expression in querytree.modifier_expressions(node):
            self._output(expression, "ORDER BY, DISTINCT ON and LIMIT", aliases)

    def _from(self, ref: dict[str, Any]) -> None:
        if querytree.table_ref_type(ref) != "BASE_TABLE" or (
            querytree.table_name(ref).lower() != self.terms.dataset
        ):
            raise self.fail(f"the query must read dataset {self.terms.dataset} alone (no joins)")
        if querytree.table_alias(ref):
            self.qualifiers = frozenset({querytree.table_alias(ref)})

    def _plain_column(self, expression: object, where: str) -> str | None:
        """The granted column expression names plainly (plant, or part_defects.plant); None
        for an expression that is no column reference; refuses every other way of naming
        a column (#n, *, COLUMNS(...), struct fields, the whole row)."""
        if not sqltree.is_expression(expression):
            return None
        reference = sqltree.column_reference(expression)
        if reference is None:
            return None
        if reference.kind is sqltree.ReferenceKind.POSITION:
            raise self.fail(f"positional references (#n) are not allowed in {where}: name columns")
        if reference.kind is sqltree.ReferenceKind.STAR:
            raise self.fail(f"* and COLUMNS(...) are not allowed in {where}")
        names = reference.names
        if len(names) == 2 and names[0] in self.qualifiers:
            names = names[1:]
        if len(names) != 1:
            raise self.fail(
                f"struct fields ({'.'.join(reference.names)}) are not allowed in {where}"
            )
        if names[0] not in self.terms.columns:
            raise self.fail(f"{where} may name only granted columns, not {names[0]}")
        return names[0]

    def _groups(self, node: dict[str, Any]) -> frozenset[str]:
        if querytree.aggregate_handling(node) != "STANDARD_HANDLING":
            raise self.fail("GROUP BY ALL is not allowed: name the grouping columns")
        names = []
        for expression in querytree.group_expressions(node):
            name = self._plain_column(expression, "GROUP BY")
            if name is None:
                raise self.fail("GROUP BY may list only granted columns by name")
            names.append(name)
        if (querytree.group_sets(node) or [[]]) != [list(range(len(names)))]:
            raise self.fail("GROUPING SETS, ROLLUP and CUBE are not allowed")
        return frozenset(names)

    def _where(self, where: object) -> None:
        for expression in sqltree.all_expressions(where):
            kind = sqltree.expression_class(expression)
            if kind in ("SUBQUERY", "WINDOW"):
                raise self.fail("subqueries and window functions are not allowed")
            if kind == "FUNCTION" and _is_aggregate(expression):
                raise self.fail("aggregates are not allowed in WHERE")
            name = self._plain_column(expression, "WHERE")
            if name is not None and name not in self.groups:
                raise self.fail(f"WHERE may name only grouping columns, not {name}")

    def _output(
        self, value: object, where: str, aliases: set[str] | frozenset[str] = frozenset()
    ) -> None:
        """Group columns, constants and allowed aggregates, combined by scalar functions."""
        if not sqltree.is_expression(value):
            return
        kind = sqltree.expression_class(value)
        if kind in _REFUSED_OUTPUTS:
            raise self.fail(f"{_REFUSED_OUTPUTS[kind]} are not allowed in {where}")
        reference = sqltree.column_reference(value)
        if reference is not None:
            if reference.is_plain_name and reference.names[0] in aliases:
                return
            name = self._plain_column(value, where)
            if name not in self.groups:
                raise self.fail(f"column {name} in {where} must be grouped or aggregated")
            return
        if kind == "FUNCTION" and _is_aggregate(value):
            self._aggregate(value)
            return
        for expression in sqltree.child_expressions(value):
            self._output(expression, where, aliases)

    def _aggregate(self, function: dict[str, Any]) -> None:
        name = sqltree.function_name(function)
        if name not in AGGREGATE_ONLY_FUNCTIONS:
            raise self.fail(f"aggregate {name}() is not allowed")
        if sqltree.function_has_modifiers(function):
            raise self.fail("FILTER, ORDER BY and EXPORT_STATE inside an aggregate are not allowed")
        arguments = sqltree.function_arguments(function)
        if name == "count_star" and not arguments:
            return
        where = f"the argument of {name}()"
        column = self._plain_column(arguments[0], where) if len(arguments) == 1 else None
        if column is None:
            raise self.fail(f"{name}() must read one granted column by name")
        if name in EXTREMUM_FUNCTIONS and column not in self.terms.measurement_columns:
            raise self.fail(f"{name}() may read only unmasked number or date columns, not {column}")


def _is_aggregate(function: dict[str, Any]) -> bool:
    name = sqltree.function_name(function)
    return name in AGGREGATE_FUNCTIONS or name in WINDOW_FUNCTIONS or name == "count_star"


class AggregateRelation(NoisyRelation, Protocol):
    """What the aggregate-only form needs of an enforced relation (see enforce.Relation)."""

    @property
    def dataset(self) -> str: ...
    @property
    def column_names(self) -> tuple[str, ...]: ...
    @property
    def measurement_columns(self) -> frozenset[str]: ...
    @property
    def min_group_size(self) -> int: ...


def aggregate_form(
    sql: str, datasets: Sequence[str], relations: Sequence[AggregateRelation]
) -> str:
    """sql as it runs: rewritten to the aggregate-only form when it reads such a dataset."""
    limited = [r for r in relations if r.min_group_size]
    if not limited:
        return sql
    relation = limited[0]
    if tuple(datasets) != (relation.dataset,):
        help_text = aggregate_form_help(relation.dataset, relation.min_group_size)
        raise QueryRejected(
            "a query on an aggregate-only dataset may read no other dataset (no joins, unions "
            f"or subqueries over others); {help_text}"
        )
    return aggregate_only_query(
        grouping_form(sql, relation),  # declared grouping sets; the measurements under noise
        AggregateTerms(
            relation.dataset,
            frozenset(relation.column_names),
            relation.measurement_columns,
            relation.min_group_size,
        ),
    )
