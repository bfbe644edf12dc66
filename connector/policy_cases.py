"""Policy test cases: plain YAML cases run through the server's own code, without a server.

Each case is decided by `Provider.explain_at` (the guard, the policy engine, the mask
consistency rule, the name binding and the limits, exactly as Explain and Query decide) and,
when allowed, run by `QueryRun` against the home's data, read-only, to learn the columns the
peer would receive. The Provider is one of our own: its audit log, quota ledger and shaped
copies live in a scratch folder and its keys are throwaway, so the home is never written.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import yaml

from connector.arrow_stream import read_ipc_pieces
from connector.audit_entry import AuditEntry
from connector.config import Settings
from connector.errors import ConnectorError, PermissionDenied, PolicyError
from connector.identity import MemberIdentity
from connector.names import MEMBER_ID, PURPOSE
from connector.offline import (
    FixedPolicies,
    PolicyTimeline,
    close_offline,
    offline_provider,
    signed_drafts,
)
from connector.policy.model import read_limited
from connector.policy.opa import engine_factory, opa_link
from connector.policy.registry import EngineFactory, PolicySnapshot
from connector.policy.signing import (
    PolicyVerdict,
    VerdictStatus,
    trusted_keys,
)
from connector.policy.versions import read_records
from connector.policy.yaml_strict import ANY_TEXT, PolicyReader, compose_strict
from connector.query_run import QueryRun
from connector.request import Explanation, PeerRequest
from connector.shaping import MASK_KINDS

MAX_CASES_BYTES = 1024 * 1024
CASE_KEYS = {"name": 1, "member": 1, "purpose": 1, "sql": 1, "at": 0, "expect": 1}
EXPECT_KEYS = {"decision": 1, "reason": 0, "columns": 0, "masked": 0}
DECISIONS = ("allow", "deny")


@dataclass(frozen=True)
class Expectation:
    """What a case expects: the decision and, optionally, a reason, the columns and masks."""

    decision: str
    reason: str = ""  # a substring of one denial reason (any case)
    columns: tuple[str, ...] | None = None  # exactly the result's columns (any order)
    masked: Mapping[str, str] | None = None  # exactly the masked result columns and how


@dataclass(frozen=True)
class PolicyCase:
    """One case of a case file: who asks what for which purpose, when, and what is expected."""

    name: str
    member: str
    purpose: str
    sql: str
    at: dt.datetime | None
    expect: Expectation
    path: Path
    line: int


@dataclass(frozen=True)
class CaseOutcome:
    """What the connector did with a case: the decision, its reasons, the result's columns."""

    decision: str
    reasons: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    masked: Mapping[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """The outcome in one line."""
        if self.decision == "deny":
            return f"deny ({'; '.join(self.reasons) or 'no reason given'})"
        return f"allow (columns {_listed(self.columns)})"


def read_cases(path: Path) -> list[PolicyCase]:
    """The cases of one file; PolicyError names the file, the line and the fix."""
    data = read_limited(path, MAX_CASES_BYTES)
    root = compose_strict(path, data)
    reader = PolicyReader(path)
    if not isinstance(root, yaml.SequenceNode) or not root.value:
        raise reader.fail(
            root,
            "a case file is a non-empty list of cases, each starting with '- name: ...' and "
            "holding member, purpose, sql and expect (allow or deny)",
        )
    cases = [_case(reader, node, n) for n, node in enumerate(root.value, 1)]
    seen: dict[str, int] = {}
    for case in cases:
        if case.name in seen:
            raise PolicyError(
                f"case name {case.name!r} is also used on line {seen[case.name]}; give each "
                "case its own name",
                path=str(path),
                line=case.line,
            )
        seen[case.name] = case.line
    return cases


def _case(reader: PolicyReader, node: yaml.Node, number: int) -> PolicyCase:
    where = f"case {number}"
    fields = reader.mapping(node, where, CASE_KEYS)
    missing = [k for k, required in CASE_KEYS.items() if required and k not in fields]
    if missing:
        raise reader.fail(node, f"{where} lacks {', '.join(missing)}; add them")
    name = reader.text(fields["name"][1], f"the name of {where}", ANY_TEXT)
    where = f"case {name!r}"
    sql = reader.text(fields["sql"][1], f"the sql of {where}")
    at = reader.moment(fields["at"][1], f"the at of {where}") if "at" in fields else None
    return PolicyCase(
        name=name,
        member=reader.text(fields["member"][1], f"the member of {where}", MEMBER_ID),
        purpose=reader.text(fields["purpose"][1], f"the purpose of {where}", PURPOSE),
        sql=sql,
        at=at,
        expect=_expectation(reader, fields["expect"][1], f"the expect of {where}"),
        path=reader.path,
        line=node.start_mark.line + 1,
    )


def _expectation(reader: PolicyReader, node: yaml.Node, where: str) -> Expectation:
    if isinstance(node, yaml.ScalarNode):
        return Expectation(_decision(reader, node, where))
    fields = reader.mapping(node, where, EXPECT_KEYS)
    if "decision" not in fields:
        raise reader.fail(node, f"{where} lacks decision; add 'decision: allow' or 'deny'")
    decision = _decision(reader, fields["decision"][1], f"the decision of {where}")
    for key, needs in (("reason", "deny"), ("columns", "allow"), ("masked", "allow")):
        if key in fields and decision != needs:
            raise reader.fail(
                fields[key][0],
                f"{key} in {where} applies only to decision {needs}; remove it, or expect {needs}",
            )
    reason = (
        reader.text(fields["reason"][1], f"the reason of {where}") if "reason" in fields else ""
    )
    columns = (
        reader.text_list(fields["columns"][1], f"the columns of {where}", ANY_TEXT)
        if "columns" in fields
        else None
    )
    masked = _masked(reader, fields["masked"][1], where) if "masked" in fields else None
    return Expectation(decision, reason, columns, masked)


def _decision(reader: PolicyReader, node: yaml.Node, where: str) -> str:
    value = reader.scalar(node, where)
    if value not in DECISIONS:
        raise reader.fail(
            node,
            f"{where} must be allow or deny, or a mapping with decision, reason, columns and "
            "masked",
        )
    return str(value)


def _masked(reader: PolicyReader, node: yaml.Node, where: str) -> dict[str, str]:
    if isinstance(node, yaml.MappingNode) and not node.value:
        return {}  # masked: {} expects no masked column
    kinds = {kind: 1 for kind in MASK_KINDS}
    masked: dict[str, str] = {}
    if not isinstance(node, yaml.MappingNode):
        raise reader.fail(
            node, f"masked in {where} must map columns to how, like {{part_no: hash}}"
        )
    for key_node, value_node in node.value:
        column = reader.text(key_node, f"a masked column in {where}", ANY_TEXT)
        if column in masked:
            raise reader.fail(key_node, f"column {column} appears twice in masked in {where}")
        kind = reader.text(value_node, f"the mask of {column} in {where}")
        if kind not in kinds:
            raise reader.fail(
                value_node, f"mask {kind!r} of {column} in {where} is not one of {', '.join(kinds)}"
            )
        masked[column] = kind
    return masked


def mismatch(expect: Expectation, got: CaseOutcome) -> str | None:
    """How the outcome differs from the expectation ('expected ..., got ...'), or None."""
    if expect.decision != got.decision:
        return f"expected {expect.decision}, got {got.describe()}"
    wanted = expect.reason.casefold()
    if wanted and not any(wanted in reason.casefold() for reason in got.reasons):
        return f"expected a reason containing {expect.reason!r}, got {got.describe()}"
    if expect.columns is not None and sorted(expect.columns) != sorted(got.columns):
        return f"expected columns {_listed(expect.columns)}, got {_listed(got.columns)}"
    if expect.masked is not None and dict(expect.masked) != dict(got.masked):
        return f"expected masked {_masks(expect.masked)}, got {_masks(got.masked)}"
    return None


def _listed(columns: Sequence[str]) -> str:
    return "[" + ", ".join(columns) + "]"


def _masks(masked: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{c}: {k}" for c, k in sorted(masked.items())) + "}"


@dataclass(frozen=True)
class PolicySource:
    """Where the tested policies come from: the home's signed folder, or unsigned drafts
    (signed in a scratch folder with a throwaway key, offline.py, so that the server's own
    loader judges both)."""

    directory: Path  # as the user named it
    signed: bool
    timeline: PolicyTimeline

    @classmethod
    def of_home(cls, settings: Settings, engine: EngineFactory) -> PolicySource:
        """The home's policies folder, judged as the server judges it (signatures, versions)."""
        versions = settings.policies.versions_file
        directory = settings.policies.directory
        trusted = trusted_keys(settings.policies.trusted_signers.values())
        remembered = read_records(versions) if versions and versions.exists() else {}
        return cls(directory, True, PolicyTimeline(directory, trusted, engine, remembered))

    @classmethod
    def drafts(cls, directory: Path, scratch: Path, engine: EngineFactory) -> PolicySource:
        """Unsigned draft policies in directory (every file must parse)."""
        folder, trusted = signed_drafts(directory, scratch)
        return cls(directory, False, PolicyTimeline(folder, trusted, engine))

    def in_force(self, at: dt.datetime, *, today: bool) -> PolicySnapshot:
        """The policies the server would hold in force at `at`. The versions it remembers
        apply only today (a past or future `at` is judged by the files' dates alone)."""
        return self.timeline.at(at, remembered=today)

    def verdicts(self, now: dt.datetime) -> tuple[PolicyVerdict, ...]:
        """Every file's verdict now (to say which files are not in force)."""
        return self.timeline.at(now, remembered=True).verdicts


def engine_factory_for(settings: Settings) -> EngineFactory:
    """The home's policy engine over given policies. An OPA server gets them under names of
    their own: the connector's own names there must keep the policies in force."""
    return engine_factory(settings, opa_link(settings, namespace_of="policy-test"))


class CaseRunner:
    """Runs cases on a Provider of its own over the home's data (read-only)."""

    def __init__(self, settings: Settings, drafts: Path | None, engine: EngineFactory) -> None:
        self._settings = settings
        self._scratch = tempfile.TemporaryDirectory(prefix="connector-policy-test-")
        scratch = Path(self._scratch.name)
        try:
            self.source = (
                PolicySource.of_home(settings, engine)
                if drafts is None
                else PolicySource.drafts(drafts, scratch, engine)
            )
            self._registry = FixedPolicies(
                self.source.in_force(dt.datetime.now(dt.UTC), today=True)
            )
            self.provider = offline_provider(settings, scratch, self._registry)
        except BaseException:
            self._scratch.cleanup()
            raise

    def __enter__(self) -> CaseRunner:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the sandbox, the scratch log and ledger, and remove the scratch folder."""
        close_offline(self.provider)
        self._scratch.cleanup()

    def run(self, case: PolicyCase, now: dt.datetime) -> CaseOutcome:
        """Decide the case as the server would at case.at (else now) and shape its result."""
        at = case.at or now
        self._registry.hold(self.source.in_force(at, today=case.at is None))
        if case.member in self._settings.revoked.members:
            return CaseOutcome("deny", (f"member {case.member!r} is revoked by this connector",))
        try:
            request = PeerRequest.checked(case.sql, case.purpose, 1, "")
            explanation = self.provider.explain_at(case.member, request, at)
            if not explanation.decision.allow:
                return CaseOutcome("deny", explanation.decision.reasons)
            columns = self._result_columns(case.member, request, explanation)
        except PermissionDenied as denied:
            return CaseOutcome("deny", tuple(denied.reasons))
        except ConnectorError as error:
            return CaseOutcome("deny", (error.message,))
        masks = {c: str(kind) for r in explanation.relations for c, kind in r.shaping.masks}
        return CaseOutcome("allow", (), columns, {c: masks[c] for c in columns if c in masks})

    def _result_columns(
        self, member_id: str, request: PeerRequest, explanation: Explanation
    ) -> tuple[str, ...]:
        """The columns of the answer, from its first row run as Query runs it."""
        provider = self.provider
        member = MemberIdentity(provider.dataspace, member_id, member_id, 0)
        slot = provider.slots.acquire(member_id)
        try:
            run = QueryRun(provider, member, request, explanation, AuditEntry("query"), slot=slot)
        except BaseException:
            slot.finish()
            raise
        pieces = run.pieces(provider.max_query_seconds)
        try:
            return tuple(read_ipc_pieces(list(pieces)).schema.names)
        finally:
            pieces.close()
            run.close()


def verdict_notes(source: PolicySource, now: dt.datetime) -> list[str]:
    """For the home's folder: each file that is not in force now, and why."""
    if not source.signed:
        return []
    return [
        f"{v.path.name}: not in force: {v.message}"
        for v in source.verdicts(now)
        if v.status is not VerdictStatus.VALID
    ]
