"""What a peer asks, checked, and what the connector decides about it (the dry run)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from connector.enforce import Relation
from connector.errors import QueryRejected
from connector.names import PURPOSE, REQUEST_ID
from connector.noise import BudgetStatus, NoisePlan, PrivacyCharge
from connector.policy.engine import Decision
from connector.quota import PolicyQuota
from connector.sqlguard import QueryShape


@dataclass(frozen=True)
class PeerRequest:
    """A peer's query request, its fields checked (they are hostile input)."""

    sql: str
    purpose: str
    max_rows: int
    request_id: str
    since_version: int = 0  # not 0: only the rows appended after this dataset version

    @classmethod
    def checked(
        cls, sql: str, purpose: str, max_rows: int, request_id: str, since_version: int = 0
    ) -> PeerRequest:
        """Validate the fields; QueryRejected says which one is wrong and how to fix it."""
        if not PURPOSE.fullmatch(purpose):
            raise QueryRejected(
                "purpose must be 1-128 letters, digits, spaces or . _ : / - (the purpose your "
                "catalog lists for the dataset)"
            )
        if request_id and not REQUEST_ID.fullmatch(request_id):
            raise QueryRejected("request_id must be 1-128 printable ASCII characters, or empty")
        if max_rows < 0:
            raise QueryRejected("max_rows must not be negative")
        if since_version < 0:
            raise QueryRejected("since_version must not be negative")
        return cls(sql, purpose, max_rows, request_id or str(uuid.uuid4()), since_version)


@dataclass(frozen=True)
class Explanation:
    """The dry run of a query: the decision and the relations it would run on."""

    shape: QueryShape
    decision: Decision
    relations: tuple[Relation, ...]
    quotas: tuple[PolicyQuota, ...] = ()
    max_rows: int = 0  # the tightest max_rows_per_query of the policies used (0: none)
    max_bytes: int = 0  # the tightest max_bytes_per_query of the policies used (0: none)
    sql: str = ""  # what runs: the peer's SQL, or its aggregate-only rewrite ("" if denied)
    noise: NoisePlan | None = None  # how the answer is noised (None: exact)
    privacy: tuple[PrivacyCharge, ...] = ()  # the privacy budget the query spends
    budget: BudgetStatus | None = None  # the member's privacy budget left today
    generation: int = -1  # the store's state (commit gate generation) it was decided on
    # Each dataset read: (name, since_version, version): the rows after since (0: all) up to
    # and including version.
    versions: tuple[tuple[str, int, int], ...] = ()
