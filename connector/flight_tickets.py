"""Flight SQL tickets and prepared statements, kept by the connector (never trusted from a peer).

A ticket is a random handle for a plan the control step (GetFlightInfo) decided on: the
member, the purpose, the query, the policy versions that allowed it and the decision itself
(reused by DoGet while still valid, so a query is decided once). It is redeemed once,
only by that member, within its lifetime; the handle itself carries nothing to forge.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from connector.decided import Decided
from connector.errors import PermissionDenied, ResourceExhausted
from connector.policy.ref import PolicyRef, policy_refs

TICKET_SECONDS = 60.0  # a ticket not redeemed within this is void
PREPARED_SECONDS = 600.0  # a prepared statement not used for this long is forgotten
MAX_PER_MEMBER = 64  # outstanding tickets (or prepared statements) one member may hold
HANDLE_BYTES = 32

TICKET_REFUSED = (
    "this Flight ticket is not valid: it was used already, expired (tickets last "
    f"{TICKET_SECONDS:.0f} s), belongs to another member, or was never issued; run the query "
    "again to get a new one"
)
PREPARED_REFUSED = (
    "this prepared statement is not valid: it was closed, unused for "
    f"{PREPARED_SECONDS / 60:.0f} minutes, belongs to another member, or was never made; "
    "prepare the query again"
)
POLICIES_CHANGED = (
    "the usage policies that allowed this query changed after its ticket was issued; run the "
    "query again to have it decided under the policies in force"
)


@dataclass(frozen=True)
class Plan:
    """What a ticket stands for: who may redeem it, and what was decided for whom."""

    member_id: str
    purpose: str
    sql: str
    request_id: str
    # The decision itself, with what it was taken on: DoGet runs the query on it while
    # nothing that decision depends on changed, and decides again otherwise.
    decided: Decided | None = None
    metadata: bytes = b""  # for a metadata command: the command itself (no query)

    @property
    def policies(self) -> tuple[PolicyRef, ...]:
        """The policies (id@version) that allowed the query (none for metadata)."""
        if self.decided is None:
            return ()
        return policy_refs(self.decided.explanation.decision.policies)


@dataclass(frozen=True)
class Prepared:
    """A prepared statement: a query a member may run (its decision is reused by each run
    while nothing it depends on changed, and taken again otherwise)."""

    member_id: str
    purpose: str
    sql: str
    decided: Decided | None = None


Held = TypeVar("Held", Plan, Prepared)


class HandleBook(Generic[Held]):
    """Random handles to values owned by one member each: bounded, expiring, thread-safe."""

    def __init__(
        self,
        lifetime: float,
        *,
        single_use: bool,
        per_member: int = MAX_PER_MEMBER,
        refusal: str = TICKET_REFUSED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """refusal: what a peer is told when a handle is not (or no longer) its own."""
        self._lifetime = lifetime
        self._refusal = refusal
        self._single_use = single_use
        self._per_member = per_member
        self._clock = clock
        # In expiry order: every handle lives the same lifetime from its issue or last use,
        # and a use moves it to the end.
        self._held: OrderedDict[bytes, tuple[float, Held]] = OrderedDict()
        self._by_member: Counter[str] = Counter()
        self._lock = threading.Lock()

    def check_room(self, member_id: str) -> None:
        """ResourceExhausted when member_id holds the most handles kept per member: asked
        before a decision is taken for a new one, so that decisions never fetched (free
        probes of the policies) are bounded by the unused handles a member may hold."""
        with self._lock:
            self._check_room(member_id)

    def issue(self, value: Held) -> bytes:
        """A new handle for value; ResourceExhausted when its member holds too many."""
        with self._lock:
            self._check_room(value.member_id)
            handle = secrets.token_bytes(HANDLE_BYTES)
            self._held[handle] = (self._clock() + self._lifetime, value)
            self._by_member[value.member_id] += 1
            return handle

    def take(self, handle: bytes, member_id: str) -> Held:
        """The value of handle for member_id (removed when single-use); PermissionDenied when
        it is unknown, expired or another member's. A handle shown by the wrong member is
        void afterwards: whoever leaked it must ask again."""
        with self._lock:
            self._expire()
            held = self._pop(handle)
            if held is None or held[1].member_id != member_id:
                raise PermissionDenied([self._refusal])
            if not self._single_use:
                self._held[handle] = (self._clock() + self._lifetime, held[1])
                self._by_member[member_id] += 1
            return held[1]

    def update(self, handle: bytes, value: Held) -> None:
        """Hold value for handle instead, if handle is still held for value's member."""
        with self._lock:
            held = self._held.get(handle)
            if held is not None and held[1].member_id == value.member_id:
                self._held[handle] = (held[0], value)

    def close(self, handle: bytes, member_id: str) -> None:
        """Forget handle if member_id holds it (closing another's handle does nothing)."""
        with self._lock:
            held = self._held.get(handle)
            if held is not None and held[1].member_id == member_id:
                self._pop(handle)

    def _check_room(self, member_id: str) -> None:
        self._expire()
        held = self._by_member[member_id]
        if held >= self._per_member:
            raise ResourceExhausted(
                f"you hold {held} unused Flight tickets or prepared statements, the most "
                "this connector keeps per member; fetch or close them first"
            )

    def _expire(self) -> None:
        now = self._clock()
        while self._held:
            handle, (until, _) = next(iter(self._held.items()))
            if until > now:
                return
            self._pop(handle)

    def _pop(self, handle: bytes) -> tuple[float, Held] | None:
        held = self._held.pop(handle, None)
        if held is not None:
            member_id = held[1].member_id
            self._by_member[member_id] -= 1
            if not self._by_member[member_id]:
                del self._by_member[member_id]
        return held

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
