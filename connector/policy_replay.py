"""Replay the requests in a home's audit log against draft policies: what would change.

Each recorded query or explain request is decided again by the same code Explain uses
(`Provider.dry_run`), on an offline Provider (offline.py: nothing in the home is written)
over the draft policies, as of the request's own time (or one fixed moment).
"""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connector.audit_chain import read_entries
from connector.audit_entry import AuditEntry
from connector.config import Settings
from connector.errors import ConfigError, ConnectorError, QueryRejected
from connector.identity import MemberIdentity
from connector.offline import (
    FixedPolicies,
    PolicyTimeline,
    close_offline,
    offline_provider,
    signed_drafts,
)
from connector.policy.engine import PolicyEngine
from connector.policy.model import UsagePolicy
from connector.policy.opa import build_engine
from connector.policy.ref import PolicyRef
from connector.policy.registry import PolicySnapshot
from connector.policy.signing import (
    VerdictStatus,
    policy_files,
    trusted_keys,
    verify_policy,
)
from connector.provider import Provider
from connector.request import PeerRequest

# Request kinds that carry a query (a catalog request has none to replay).
REPLAYED_KINDS = ("query", "explain")
_SIGNED = (VerdictStatus.VALID, VerdictStatus.EXPIRED, VerdictStatus.NOT_YET_VALID)

Masks = Mapping[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Outcome:
    """What the policies made of one request: allow, deny or rejected, and what was shown."""

    verdict: str  # "allow", "deny" or "rejected" (the query itself was refused)
    reasons: tuple[str, ...] = ()
    columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    masks: Masks | None = None  # None: not known (not recorded in the audit log)
    policies: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        """Whether the policies allowed the request."""
        return self.verdict == "allow"


@dataclass(frozen=True)
class RecordedRequest:
    """The fields of one audit entry that a replay reads."""

    seq: int
    line: int
    time: dt.datetime
    kind: str
    member: str
    purpose: str
    query: str
    then: Outcome


@dataclass(frozen=True)
class Change:
    """A request whose outcome the drafts would change, and how."""

    request: RecordedRequest
    draft: Outcome
    kinds: tuple[str, ...]  # "allowed -> denied", "denied -> allowed", "columns", "masks"


@dataclass(frozen=True)
class NotReplayable:
    """A recorded request that cannot be decided again, and why."""

    seq: int
    line: int
    member: str
    why: str


@dataclass
class ReplayReport:
    """Everything a replay found."""

    audit_log: Path
    drafts: Path
    at: dt.datetime | None
    draft_files: tuple[Path, ...] = ()
    unsigned: tuple[Path, ...] = ()
    changes: list[Change] = field(default_factory=list)
    unchanged: int = 0
    not_replayable: list[NotReplayable] = field(default_factory=list)
    without_query: int = 0  # catalog requests: no query to replay

    @property
    def replayed(self) -> int:
        """How many requests were decided again."""
        return len(self.changes) + self.unchanged

    def count(self, kind: str) -> int:
        """How many changes are of this kind."""
        return sum(kind in c.kinds for c in self.changes)


def _embedded(policies: Sequence[UsagePolicy]) -> PolicyEngine:
    # Replay compares policies, not engines: the embedded one, whatever the home uses.
    return build_engine("embedded", policies)


def _decide(
    provider: Provider,
    held: FixedPolicies,
    policies: PolicySnapshot,
    request: RecordedRequest,
    moment: dt.datetime,
) -> Outcome:
    """The outcome the Explain path gives for the request under these policies at moment."""
    held.hold(policies)
    provider.clock = lambda: moment
    member = MemberIdentity(provider.dataspace, request.member, "", 0)
    entry = AuditEntry(request.kind)  # filled in by the dry run, never appended
    try:
        checked = PeerRequest.checked(request.query, request.purpose, 0, "")
        explanation = provider.dry_run(member, checked, entry)
    except QueryRejected as error:
        return Outcome("rejected", (error.message,))
    decision = explanation.decision
    columns = {d: tuple(c) for d, c in entry.columns.items()}
    # Only the masks on columns the query reads: the others change nothing it receives.
    masks = {
        r.dataset: tuple((c, str(k)) for c, k in r.shaping.masks if c in columns.get(r.dataset, ()))
        for r in explanation.relations
    }
    return Outcome(
        "allow" if decision.allow else "deny",
        tuple(decision.reasons),
        columns,
        masks,
        tuple(str(PolicyRef(i, v)) for i, v in decision.policies),
    )


def _moment_of(entry: Mapping[str, Any], line: int, path: Path) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(str(entry.get("time")))
    except ValueError:
        raise ConfigError(
            f"{path}: line {line}: the entry's time {entry.get('time')!r} is not an ISO time; "
            "the log was edited or damaged: run `connector audit verify --home HOME`"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _recorded_outcome(entry: Mapping[str, Any]) -> Outcome:
    if entry.get("outcome") == "rejected":
        verdict = "rejected"
    else:
        verdict = "allow" if entry.get("decision") == "allow" else "deny"
    columns = entry.get("columns")
    policies = entry.get("policies")
    return Outcome(
        verdict,
        tuple(str(r) for r in entry.get("reasons") or ()),
        {str(d): tuple(str(c) for c in cols) for d, cols in columns.items()}
        if isinstance(columns, dict)
        else {},
        None,
        tuple(
            str(PolicyRef(str(p.get("id")), int(p.get("version", 0))))
            for p in policies
            if isinstance(p, dict)
        )
        if isinstance(policies, list)
        else (),
    )


def recorded_requests(
    path: Path, since: dt.datetime | None, report: ReplayReport
) -> Iterator[RecordedRequest]:
    """The replayable requests of the log; the others are noted in report.

    Raises ConfigError naming the file and line for a log that cannot be read.
    """
    if not path.exists():
        return
    try:
        for line, entry in enumerate(read_entries(path), 1):
            if entry.get("type") != "request":
                continue
            moment = _moment_of(entry, line, path)
            if since is not None and moment < since:
                continue
            if entry.get("kind") not in REPLAYED_KINDS:
                report.without_query += 1
                continue
            try:
                request = _recorded(entry, line, moment, report)
            except (TypeError, AttributeError, ValueError):
                raise ValueError(
                    f"line {line} (entry {entry.get('seq')}) has a field of the wrong form"
                ) from None
            if request is not None:
                yield request
    except ValueError as error:
        raise ConfigError(
            f"{path}: {error}; the log was edited or damaged: run "
            "`connector audit verify --home HOME` to find the first broken entry"
        ) from None


def _recorded(
    entry: Mapping[str, Any], line: int, moment: dt.datetime, report: ReplayReport
) -> RecordedRequest | None:
    seq = entry.get("seq") if isinstance(entry.get("seq"), int) else 0
    member, query = entry.get("member_id"), entry.get("query")
    why = ""
    if not isinstance(member, str) or not member:
        why = "no member was authenticated, so no policy was asked"
    elif entry.get("decision") not in ("allow", "deny") and entry.get("outcome") != "rejected":
        why = f"refused before any policy was asked (outcome {entry.get('outcome')!r})"
    elif not isinstance(query, str) or (not query and entry.get("query_length")):
        why = (
            f"the query ({entry.get('query_length')} characters) was too long or held hidden "
            "control characters, so the log keeps only its sha256"
        )
    if why:
        report.not_replayable.append(NotReplayable(int(seq or 0), line, str(member or "-"), why))
        return None
    return RecordedRequest(
        int(seq or 0),
        line,
        moment,
        str(entry.get("kind")),
        str(member),
        str(entry.get("purpose", "")),
        str(query),
        _recorded_outcome(entry),
    )


def changes_between(then: Outcome, draft: Outcome) -> tuple[str, ...]:
    """How the draft outcome differs from the recorded one (empty: unchanged)."""
    if then.allowed and not draft.allowed:
        return ("allowed -> denied",)
    if draft.allowed and not then.allowed:
        return ("denied -> allowed",)
    if not then.allowed:
        return ()
    kinds = []
    if dict(then.columns) != dict(draft.columns):
        kinds.append("columns")
    if then.masks is not None and draft.masks is not None and then.masks != draft.masks:
        kinds.append("masks")
    return tuple(kinds)


def replay(
    settings: Settings,
    drafts: Path,
    *,
    since: dt.datetime | None = None,
    at: dt.datetime | None = None,
) -> ReplayReport:
    """Decide every recorded query again under the drafts (as of its time, or at)."""
    report = ReplayReport(settings.audit_log, drafts, at)
    home_trusted = trusted_keys(settings.policies.trusted_signers.values())
    now = dt.datetime.now(dt.UTC)
    report.draft_files = tuple(policy_files(drafts)) if drafts.is_dir() else ()
    report.unsigned = tuple(
        p for p in report.draft_files if verify_policy(p, home_trusted, now).status not in _SIGNED
    )
    with tempfile.TemporaryDirectory(prefix="connector-replay-") as name:
        scratch = Path(name)
        folder, draft_trusted = signed_drafts(drafts, scratch)
        draft_set = PolicyTimeline(folder, draft_trusted, _embedded)
        home_set = PolicyTimeline(settings.policies.directory, home_trusted, _embedded)
        held = FixedPolicies(draft_set.at(now))
        provider = offline_provider(settings, scratch, held)
        try:
            for request in recorded_requests(settings.audit_log, since, report):
                moment = at or request.time
                _replay_one(
                    provider,
                    held,
                    request,
                    moment,
                    draft_set=draft_set,
                    home_set=home_set,
                    report=report,
                )
        finally:
            close_offline(provider)
    return report


def _replay_one(
    provider: Provider,
    held: FixedPolicies,
    request: RecordedRequest,
    moment: dt.datetime,
    *,
    draft_set: PolicyTimeline,
    home_set: PolicyTimeline,
    report: ReplayReport,
) -> None:
    try:
        draft = _decide(provider, held, draft_set.at(moment), request, moment)
        then = _with_masks(
            request.then, _decide(provider, held, home_set.at(request.time), request, request.time)
        )
    except ConnectorError as error:
        why = f"deciding it again failed: {error}"
        report.not_replayable.append(NotReplayable(request.seq, request.line, request.member, why))
        return
    kinds = changes_between(then, draft)
    if kinds:
        report.changes.append(Change(request, draft, kinds))
    else:
        report.unchanged += 1


def _with_masks(then: Outcome, home: Outcome) -> Outcome:
    """The recorded outcome with its masks, when the home's signed policies decided it the
    same way with the same policy versions (the log does not record masks)."""
    same = (
        home.verdict == then.verdict
        and set(home.policies) == set(then.policies)
        and dict(home.columns) == dict(then.columns)
    )
    if not same:
        return then
    return Outcome(then.verdict, then.reasons, then.columns, home.masks, then.policies)


def describe_outcome(outcome: Outcome) -> list[str]:
    """An outcome's columns and masks as short lines (for a change's detail)."""
    lines = []
    for dataset, columns in sorted(outcome.columns.items()):
        lines.append(f"columns of {dataset}: {', '.join(columns) or '(none)'}")
    for dataset, masks in sorted((outcome.masks or {}).items()):
        if masks:
            lines.append(f"masked in {dataset}: " + ", ".join(f"{c} ({k})" for c, k in masks))
    return lines


def draft_names(paths: Sequence[Path]) -> str:
    """File names, comma-separated."""
    return ", ".join(p.name for p in paths)
