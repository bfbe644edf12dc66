"""Turn a policy decision into the relations a query actually runs on.

Each granted dataset becomes a per-request view with only the granted columns, in the
dataset's own column order; the peer's SQL names the view, never the stored table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from connector.store import DatasetInfo, quote_identifier

log = logging.getLogger(__name__)


class GrantLike(Protocol):
    """What enforcement needs of a policy grant."""

    @property
    def dataset(self) -> str: ...
    @property
    def columns(self) -> tuple[str, ...]: ...


class DecisionLike(Protocol):
    """What enforcement needs of a policy decision."""

    @property
    def grants(self) -> Iterable[GrantLike]: ...


@dataclass(frozen=True)
class Relation:
    """A per-request view: the dataset name the peer uses, its columns and defining SQL."""

    dataset: str
    columns: tuple[str, ...]
    sql: str


def relations_for(
    decision: DecisionLike, datasets: Mapping[str, DatasetInfo]
) -> tuple[Relation, ...]:
    """The views for every granted dataset that holds data, with only granted columns."""
    relations = []
    for grant in decision.grants:
        info = datasets.get(grant.dataset)
        if info is None:
            continue
        granted = set(grant.columns)
        missing = granted - {c.name for c in info.columns}
        if missing:
            log.warning(
                "policy grants columns %s of %s, which it does not have",
                ", ".join(sorted(missing)),
                grant.dataset,
            )
        columns = tuple(c.name for c in info.columns if c.name in granted)
        select = ", ".join(quote_identifier(c) for c in columns)
        relations.append(
            Relation(
                grant.dataset,
                columns,
                f"SELECT {select} FROM datasets.{quote_identifier(grant.dataset)}",
            )
        )
    return tuple(relations)
