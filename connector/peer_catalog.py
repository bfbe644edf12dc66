"""What a peer's catalog lists of a dataset granted to it: one entry per set of purposes
that gets the same terms (columns, masks, filters, limits, policies)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connector.enforce import visible_columns
from connector.noise import BudgetStatus
from connector.policy.engine import CatalogGrant
from connector.policy.model import Limits, UsagePolicy
from connector.policy.registry import PolicySnapshot
from connector.quota import QuotaLedger
from connector.shaping import Shaping
from connector.store import ColumnInfo, DatasetInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogDataset:
    """One dataset as a peer sees it: only the columns and terms granted to that peer."""

    info: DatasetInfo
    columns: tuple[ColumnInfo, ...]
    grant: CatalogGrant
    limits: Limits
    obligations: Mapping[str, Any]
    shaping: Shaping = field(default_factory=Shaping)
    budget: BudgetStatus | None = None  # the privacy budget left today (noised datasets)


def catalog_entries(
    info: DatasetInfo, grant: CatalogGrant, policies: Sequence[UsagePolicy]
) -> list[CatalogDataset]:
    """One entry per set of purposes that gets the same terms: each is exactly what a query
    under those purposes sees (columns, masks, filters, group minimum, limits, policies)."""
    by_terms: dict[tuple[tuple[str, int], ...], list[str]] = {}
    applicable_of: dict[tuple[tuple[str, int], ...], list[UsagePolicy]] = {}
    for purpose in grant.purposes:
        applicable = [p for p in policies if purpose in p.purposes]
        if len({p.shaping.canonical() for p in applicable}) != 1:
            # Queries under this purpose are refused (policies shape the dataset differently);
            # listing a merged shape would misstate what the peer gets.
            log.warning(
                "dataset %s is not listed for purpose %r: its policies shape it differently",
                info.name,
                purpose,
            )
            continue
        key = tuple(sorted((p.id, p.version) for p in applicable))
        by_terms.setdefault(key, []).append(purpose)
        applicable_of[key] = applicable
    entries = []
    for key, purposes in by_terms.items():
        applicable = applicable_of[key]
        shaping = applicable[0].shaping
        granted = {c for p in applicable for c in p.columns} & set(grant.columns)
        entries.append(
            CatalogDataset(
                info,
                visible_columns(info, granted, shaping),
                dataclasses.replace(
                    grant,
                    columns=tuple(sorted(granted)),
                    purposes=tuple(sorted(purposes)),
                    policies=tuple(sorted((p.id, p.version) for p in applicable)),
                    valid_from=min(p.valid_from for p in applicable),
                    valid_until=max(p.valid_until for p in applicable),
                ),
                Limits.tightest(p.limits for p in applicable),
                {p.id: dataclasses.asdict(p.obligations) for p in applicable},
                shaping,
            )
        )
    return entries


def granted_catalog(
    member_id: str,
    snapshot: PolicySnapshot,
    datasets: Mapping[str, DatasetInfo],
    quotas: QuotaLedger,
    now: dt.datetime,
) -> list[CatalogDataset]:
    """The datasets granted to member_id at now, with only the granted columns and the
    privacy budget left under the policies that noise them."""
    listed = []
    for grant in snapshot.engine.catalog(member_id, now):
        info = datasets.get(grant.dataset)
        if info is None:
            log.warning("policy grants dataset %r, which holds no data yet", grant.dataset)
            continue
        policies = [snapshot.by_id[i] for i, _ in grant.policies if i in snapshot.by_id]
        for entry in catalog_entries(info, grant, policies):
            noised = [
                (i, noise)
                for i, _ in entry.grant.policies
                if (noise := snapshot.by_id[i].shaping.noise) is not None
            ]
            budget = quotas.privacy_budget(member_id, noised, now)
            listed.append(dataclasses.replace(entry, budget=budget))
    return listed
