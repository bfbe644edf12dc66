"""`policy lint`: every mistake in draft policy files, each with its file, line and a fix.

The checks run against the home's real datasets and columns, the versions it has signed or
put in force, and its other policies. Nothing here raises for a bad file: each problem
becomes a Finding, so one run shows them all. The rules that refuse a policy at load or
query time are not written again here: the model's reader, the version memory, the mask
consistency check and the Rego decision library are asked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import enum
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from connector.errors import PolicyEngineError, PolicyError
from connector.policy.consistency import mask_conflicts
from connector.policy.engine import DecisionRequest, EmbeddedEngine
from connector.policy.fit import value_fits
from connector.policy.model import (
    MAX_POLICY_BYTES,
    REQUIRED,
    SCHEMA,
    UsagePolicy,
    policy_from_node,
    read_limited,
)
from connector.policy.signing import memory_refusal
from connector.policy.terms import NOISE_KEYS
from connector.policy.versions import VersionRecord
from connector.policy.yaml_strict import PolicyReader, compose_strict
from connector.shaping import RANGE_OPERATORS
from connector.store import DatasetInfo

# Nested keys the model reads with their own tables (SCHEMA stops one level up).
_NESTED_KEYS: dict[str, Mapping[str, Any]] = {
    "aggregate_only.noise": NOISE_KEYS,
}
_EXAMPLES = {
    "id": "id: supplier-quality",
    "version": "version: 1",
    "description": "description: what the contract shares, with whom and why",
    "datasets": "datasets: [part_defects]",
    "grantees": "grantees: {members: [member-id]}",
    "purposes": "purposes: [quality-benchmarking]",
    "valid": "valid: {from: 2026-01-01, until: 2027-01-01}",
    "columns": "columns: {allow: [plant, defects]}",
    "members": "members: [member-id]",
    "from": "from: 2026-01-01",
    "until": "until: 2027-01-01",
    "allow": "allow: [plant, defects]",
}


class Severity(enum.Enum):
    """An error stops the policy from doing what was meant; a warning may be intended."""

    ERROR = "error"
    WARNING = "warning"


@dataclass(frozen=True)
class Finding:
    """One mistake: where it is, how bad, what is wrong and what to write instead."""

    file: Path
    line: int | None
    severity: Severity
    message: str
    fix: str

    def render(self) -> str:
        """The finding as `FILE:LINE: error: message` and an indented fix line."""
        where = f"{self.file}:{self.line}" if self.line is not None else f"{self.file}"
        return f"{where}: {self.severity.value}: {self.message}\n    fix: {self.fix}"


@dataclass(frozen=True)
class HomeFacts:
    """What the home knows that a draft is checked against."""

    datasets: Mapping[str, DatasetInfo] | None  # None: the data file could not be read
    signed: Sequence[UsagePolicy] = ()  # every policy signed in the home's policies folder
    in_force: Sequence[UsagePolicy] = ()  # those in force now or later (not replaced, not past)
    remembered: Mapping[str, VersionRecord] = field(default_factory=dict)
    own_member: str = ""
    revoked_members: frozenset[str] = frozenset()
    mask_consistency: str = "warn"
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


@dataclass
class Located:
    """A value read leniently from the YAML, with the line it is on."""

    value: Any
    line: int


@dataclass
class Draft:
    """What lint reads of one file even when the strict reader refuses it."""

    path: Path
    lines: dict[str, int] = field(default_factory=dict)  # dotted key -> line
    datasets: list[Located] = field(default_factory=list)
    members: list[Located] = field(default_factory=list)
    purposes: list[Located] = field(default_factory=list)
    allow: list[Located] = field(default_factory=list)
    masks: list[Located] = field(default_factory=list)
    filters: list[tuple[Located, list[Located]]] = field(default_factory=list)
    policy: UsagePolicy | None = None
    sha256: str = ""


def lint_files(paths: Sequence[Path], home: HomeFacts) -> list[Finding]:
    """Every finding for the files, then those between them and the home's policies."""
    findings: list[Finding] = []
    drafts = []
    for path in paths:
        draft, found = lint_file(path, home)
        findings += found
        if draft is not None:
            drafts.append(draft)
    findings += _duplicate_ids(drafts)
    findings += _version_findings(drafts, home)
    findings += _conflict_findings(drafts, home)
    return findings


def lint_file(path: Path, home: HomeFacts) -> tuple[Draft | None, list[Finding]]:
    """The findings of one file alone, and what was read of it (None: not YAML at all)."""
    try:
        data = read_limited(path, MAX_POLICY_BYTES)
        root = compose_strict(path, data)
    except PolicyError as error:
        return None, [_from_error(path, error)]
    if not isinstance(root, yaml.MappingNode):
        fix = "start from `connector policy new`, which writes a complete policy"
        message = "the file is empty" if root is None else "a policy must be a mapping of keys"
        return None, [Finding(path, 1, Severity.ERROR, message, fix)]
    draft = Draft(path, sha256=hashlib.sha256(data).hexdigest())
    findings = _key_findings(path, root, SCHEMA, "")
    _read_draft(draft, root)
    findings += _data_findings(draft, home)
    findings += _validity_findings(draft, root, home.now)
    findings += _grantee_findings(draft, home)
    findings += _purpose_findings(draft)
    try:
        draft.policy = policy_from_node(path, root, draft.sha256)
    except PolicyError as error:
        # Reported unless a finding of lint's own already says it better, on the same line.
        if all(f.line != error.line for f in findings if f.severity is Severity.ERROR):
            findings.append(_from_error(path, error))
    return draft, sorted(findings, key=lambda f: f.line or 0)


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to a misspelt one, if any is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def _from_error(path: Path, error: PolicyError) -> Finding:
    """A finding from the strict reader's error, its text split into the problem and the fix."""
    text = error.message
    for prefix in (f"{error.path}:{error.line}: ", f"{error.path}: "):
        text = text.removeprefix(prefix)
    problem, _, fix = text.partition("; ")
    if not fix:
        fix = "write it as the message says; `connector policy new` shows a complete policy"
    return Finding(path, error.line, Severity.ERROR, problem, fix)


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _key_findings(
    path: Path, node: yaml.MappingNode, schema: Mapping[str, Any], where: str
) -> list[Finding]:
    """Unknown keys (removed from the tree, so the rest is still read) and missing ones."""
    findings = []
    kept = []
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        dotted = f"{where}.{key}" if where else str(key)
        if not isinstance(key, str) or key not in schema:
            findings.append(_unknown_key(path, key_node, key, schema, where))
            continue
        kept.append((key_node, value_node))
        nested = schema[key] or _NESTED_KEYS.get(dotted)
        if isinstance(value_node, yaml.MappingNode) and nested:
            findings += _key_findings(path, value_node, nested, dotted)
        if dotted == "rows.where" and isinstance(value_node, yaml.MappingNode):
            for column_node, bounds in value_node.value:
                if isinstance(bounds, yaml.MappingNode):
                    inner = f"rows.where.{getattr(column_node, 'value', '?')}"
                    findings += _key_findings(path, bounds, dict.fromkeys(RANGE_OPERATORS), inner)
    node.value = kept
    required = REQUIRED if not where else _REQUIRED_INSIDE.get(where, ())
    present = {k.value for k, _ in kept if isinstance(k, yaml.ScalarNode)}
    for key in required:
        if key not in present:
            place = f"in {where}" if where else "in the policy"
            findings.append(
                Finding(
                    path,
                    _line(node),
                    Severity.ERROR,
                    f"missing key '{key}' {place}",
                    f"add it, like `{_EXAMPLES.get(key, key + ': ...')}`",
                )
            )
    return findings


_REQUIRED_INSIDE: dict[str, tuple[str, ...]] = {
    "grantees": ("members",),
    "valid": ("from", "until"),
    "columns": ("allow",),
}


def _unknown_key(
    path: Path, key_node: yaml.Node, key: Any, schema: Mapping[str, Any], where: str
) -> Finding:
    place = f"in {where}" if where else "at the top of the policy"
    if not isinstance(key, str):
        return Finding(
            path,
            _line(key_node),
            Severity.ERROR,
            f"a key {place} is not a plain name",
            f"write one of: {', '.join(schema)}",
        )
    close = did_you_mean(key, schema)
    fix = f"did you mean '{close}'? " if close else ""
    fix += f"the keys allowed {place} are: {', '.join(schema)}"
    return Finding(
        path,
        _line(key_node),
        Severity.ERROR,
        f"unknown key '{key}' {place} (this connector would refuse the whole policy)",
        fix,
    )


def _read_draft(draft: Draft, root: yaml.MappingNode) -> None:
    """Fill draft with what can be read of each part, leniently, with lines."""
    reader = PolicyReader(draft.path)
    top = _children(root)
    for key, (key_node, _) in top.items():
        draft.lines[key] = _line(key_node)
    draft.datasets = _names(top.get("datasets"), lower=True)
    draft.purposes = _names(top.get("purposes"), lower=False)
    grantees = _children(top.get("grantees"))
    draft.members = _names(grantees.get("members"), lower=False)
    columns = _children(top.get("columns"))
    draft.allow = _names(columns.get("allow"), lower=True)
    draft.masks = [Located(_lower(str(k.value)), _line(k)) for k, _ in _pairs(columns.get("mask"))]
    for name, (key_node, _) in columns.items():
        draft.lines[f"columns.{name}"] = _line(key_node)
    valid = _children(top.get("valid"))
    for name, (key_node, _) in valid.items():
        draft.lines[f"valid.{name}"] = _line(key_node)
    where = _children(_children(top.get("rows")).get("where"))
    for column, (key_node, value_node) in where.items():
        values = [
            Located(_scalar(reader, item), _line(item))
            for item in (
                value_node.value
                if isinstance(value_node, yaml.SequenceNode)
                else [v for _, v in _pairs(value_node)]
            )
        ]
        draft.filters.append((Located(_lower(column), _line(key_node)), values))


def _children(
    node: tuple[yaml.Node, yaml.Node] | yaml.Node | None,
) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """The keys of a mapping value, by name (nothing when it is not a mapping)."""
    return {str(k.value): (k, v) for k, v in _pairs(node) if isinstance(k, yaml.ScalarNode)}


def _pairs(entry: tuple[yaml.Node, yaml.Node] | yaml.Node | None) -> list[tuple[Any, Any]]:
    node = entry[1] if isinstance(entry, tuple) else entry
    return list(node.value) if isinstance(node, yaml.MappingNode) else []


def _names(entry: tuple[yaml.Node, yaml.Node] | None, *, lower: bool) -> list[Located]:
    node = entry[1] if entry is not None else None
    if not isinstance(node, yaml.SequenceNode):
        return []
    return [
        Located(_lower(item.value) if lower else item.value, _line(item))
        for item in node.value
        if isinstance(item, yaml.ScalarNode)
    ]


def _lower(name: str) -> str:
    return name.lower() if name.isascii() else name


def _scalar(reader: PolicyReader, node: yaml.Node) -> Any:
    """The value as the strict reader reads it (None when it refuses it: reported already)."""
    try:
        return reader.scalar(node, "a value")
    except PolicyError:
        return None


def _data_findings(draft: Draft, home: HomeFacts) -> list[Finding]:
    """Datasets and columns the home's data file does not have, masks and filters that
    cannot work, and a policy that grants nothing at all."""
    findings = _mask_findings(draft)
    if home.datasets is None:
        return findings
    known = [home.datasets[d.value] for d in draft.datasets if d.value in home.datasets]
    for dataset in draft.datasets:
        if dataset.value not in home.datasets:
            findings.append(_unknown_dataset(draft.path, dataset, home.datasets))
    if not known:
        if draft.datasets:
            findings.append(
                Finding(
                    draft.path,
                    draft.lines.get("datasets"),
                    Severity.ERROR,
                    "the policy grants nothing: none of its datasets is in this home's data",
                    "name a dataset of this home (`connector datasets`), or ingest it first",
                )
            )
        return findings
    types_by_dataset = {info.name: {c.name: c.type for c in info.columns} for info in known}
    every_column = {c for types in types_by_dataset.values() for c in types}
    granted = draft.allow + draft.masks
    for column in granted:
        findings += _column_findings(draft.path, column, types_by_dataset, every_column)
    if granted and not any(c.value in every_column for c in granted):
        findings.append(
            Finding(
                draft.path,
                draft.lines.get("columns"),
                Severity.ERROR,
                "the policy grants nothing: none of its columns is in its datasets",
                "list columns the datasets have: " + ", ".join(sorted(every_column)),
            )
        )
    for column, values in draft.filters:
        findings += _filter_findings(draft.path, column, values, types_by_dataset)
    return findings


def _unknown_dataset(path: Path, dataset: Located, datasets: Mapping[str, DatasetInfo]) -> Finding:
    close = did_you_mean(dataset.value, datasets)
    if close:
        fix = f"did you mean {close}? write `{close}`"
    elif datasets:
        fix = f"name one of this home's datasets: {', '.join(sorted(datasets))}"
    else:
        fix = "this home has no datasets yet: ingest it first (`connector ingest`)"
    return Finding(
        path,
        dataset.line,
        Severity.ERROR,
        f"dataset {dataset.value} is not in this home's data",
        fix,
    )


def _column_findings(
    path: Path,
    column: Located,
    types_by_dataset: Mapping[str, Mapping[str, str]],
    every_column: set[str],
) -> list[Finding]:
    lacking = sorted(d for d, types in types_by_dataset.items() if column.value not in types)
    if not lacking:
        return []
    if len(lacking) < len(types_by_dataset):
        return [
            Finding(
                path,
                column.line,
                Severity.WARNING,
                f"column {column.value} is not in dataset {', '.join(lacking)}: "
                "queries on it cannot read that column",
                "keep it only if the other datasets are meant to share it",
            )
        ]
    close = did_you_mean(column.value, every_column)
    fix = f"did you mean {close}? write `{close}`" if close else ""
    fix = fix or "list a column the dataset has: " + ", ".join(sorted(every_column))
    return [
        Finding(
            path,
            column.line,
            Severity.ERROR,
            f"column {column.value} is not in dataset {', '.join(lacking)}",
            fix,
        )
    ]


def _mask_findings(draft: Draft) -> list[Finding]:
    allowed = {c.value for c in draft.allow}
    masked = {c.value for c in draft.masks}
    findings = [
        Finding(
            draft.path,
            column.line,
            Severity.ERROR,
            f"column {column.value} is both allowed in the clear and masked",
            f"keep it in columns.allow (shown) or in columns.mask (hidden), not both; "
            f"remove {column.value} from columns.allow to keep it masked",
        )
        for column in draft.masks
        if column.value in allowed
    ]
    findings += [
        Finding(
            draft.path,
            column.line,
            Severity.WARNING,
            f"the row filter names masked column {column.value}: its values are known to "
            "the peer from the filter, which can undo the mask",
            f"filter on a column in the clear, or drop {column.value} from the mask "
            "if showing it is intended",
        )
        for column, _ in draft.filters
        if column.value in masked
    ]
    return findings


def _filter_findings(
    path: Path,
    column: Located,
    values: list[Located],
    types_by_dataset: Mapping[str, Mapping[str, str]],
) -> list[Finding]:
    findings = []
    for dataset, types in types_by_dataset.items():
        column_type = types.get(column.value)
        if column_type is None:
            close = did_you_mean(column.value, types)
            fix = f"did you mean {close}? write `{close}`" if close else ""
            findings.append(
                Finding(
                    path,
                    column.line,
                    Severity.ERROR,
                    f"the row filter names column {column.value}, which dataset {dataset} "
                    "does not have: every query on it would be refused",
                    fix or "filter on one of: " + ", ".join(sorted(types)),
                )
            )
            continue
        findings += [
            Finding(
                path,
                value.line,
                Severity.ERROR,
                f"the row filter on {dataset}.{column.value} ({column_type}) holds "
                f"{value.value!r}, which is not a value of that type: every query on it "
                "would be refused",
                f"write a value of type {column_type}{_example_of(column_type)}",
            )
            for value in values
            if value.value is not None and not value_fits(value.value, column_type)
        ]
    return findings


def _example_of(column_type: str) -> str:
    kind = column_type.split("(", maxsplit=1)[0].upper()
    if kind == "DATE" or kind.startswith("TIMESTAMP"):
        return ", like 2026-01-31"
    if kind == "BOOLEAN":
        return ", true or false"
    if kind == "VARCHAR":
        return ", like 'text' (quoted)"
    return ", like 10" if value_fits(10, column_type) else ""


def _validity_findings(draft: Draft, root: yaml.MappingNode, now: dt.datetime) -> list[Finding]:
    valid = _children(_children(root).get("valid"))
    reader = PolicyReader(draft.path)
    moments = {}
    for key in ("from", "until"):
        if key in valid:
            with contextlib.suppress(PolicyError):  # the strict reader's finding says why
                moments[key] = reader.moment(valid[key][1], f"valid.{key}")
    start, end = moments.get("from"), moments.get("until")
    line = draft.lines.get("valid.until")
    next_year = (now + dt.timedelta(days=365)).date().isoformat()
    if start is not None and end is not None and end <= start:
        return [
            Finding(
                draft.path,
                line,
                Severity.ERROR,
                f"valid.until ({end.date()}) is not after valid.from ({start.date()})",
                f"set until to a date after from, like `until: {next_year}`",
            )
        ]
    if end is not None and end <= now:
        return [
            Finding(
                draft.path,
                line,
                Severity.ERROR,
                f"valid.until ({end.isoformat()}) is already past: the policy grants nothing",
                f"set the end the contract gives, like `until: {next_year}`",
            )
        ]
    return []


def _grantee_findings(draft: Draft, home: HomeFacts) -> list[Finding]:
    """Grantees this home knows cannot use it (the data space's member directory, which
    would say who is a member, does not exist yet)."""
    findings = []
    for member in draft.members:
        if member.value == home.own_member:
            findings.append(
                Finding(
                    draft.path,
                    member.line,
                    Severity.WARNING,
                    f"grantee {member.value} is this home's own member id",
                    "name the peer member the contract is with",
                )
            )
        elif member.value in home.revoked_members:
            findings.append(
                Finding(
                    draft.path,
                    member.line,
                    Severity.ERROR,
                    f"grantee {member.value} is revoked in this home's connector.toml: "
                    "the policy grants it nothing",
                    "remove the grantee, or lift the revocation ([revoked] members)",
                )
            )
    return findings


def _purpose_findings(draft: Draft) -> list[Finding]:
    return [
        Finding(
            draft.path,
            purpose.line,
            Severity.WARNING,
            f"purpose {purpose.value!r} has capitals or spaces: peers must send it exactly so",
            f"write {purpose.value.strip().lower().replace(' ', '-')!r} unless the contract "
            "names it so",
        )
        for purpose in draft.purposes
        if isinstance(purpose.value, str)
        and (purpose.value != purpose.value.strip().lower() or " " in purpose.value)
    ]


def _duplicate_ids(drafts: Sequence[Draft]) -> list[Finding]:
    """Two linted files with one policy id: the same version is refused, a lower one is
    superseded (left over)."""
    findings = []
    by_id: dict[str, list[Draft]] = {}
    for draft in drafts:
        if draft.policy is not None:
            by_id.setdefault(draft.policy.id, []).append(draft)
    for policy_id, same in by_id.items():
        for draft in same[1:]:
            first = same[0]
            assert draft.policy is not None and first.policy is not None
            same_version = draft.policy.version == first.policy.version
            findings.append(
                Finding(
                    draft.path,
                    draft.lines.get("id"),
                    Severity.ERROR if same_version else Severity.WARNING,
                    f"policy id {policy_id} is also in {first.path}"
                    + (
                        f", with the same version {first.policy.version}: both are refused"
                        if same_version
                        else " with another version: only the higher one is put in force"
                    ),
                    "give each policy its own id, or keep only one file per policy",
                )
            )
    return findings


def _version_findings(drafts: Sequence[Draft], home: HomeFacts) -> list[Finding]:
    """A version lower than (or equal to, with other content) one signed or in force before."""
    findings = []
    for draft in drafts:
        policy = draft.policy
        if policy is None:
            continue
        line = draft.lines.get("version")
        refusal = memory_refusal(policy, draft.sha256, home.remembered)
        if refusal is not None:
            problem, _, fix = refusal[1].partition("; ")
            findings.append(Finding(draft.path, line, Severity.ERROR, problem, fix))
            continue
        for signed in home.signed:
            if signed.id != policy.id or signed.path.resolve() == draft.path.resolve():
                continue
            if signed.version > policy.version or (
                signed.version == policy.version and signed.sha256 != draft.sha256
            ):
                findings.append(
                    Finding(
                        draft.path,
                        line,
                        Severity.ERROR,
                        f"version {policy.version} of policy {policy.id} is not above version "
                        f"{signed.version} signed before ({signed.path})",
                        f"set `version: {signed.version + 1}`",
                    )
                )
    return findings


def _conflict_findings(drafts: Sequence[Draft], home: HomeFacts) -> list[Finding]:
    """Policies the connector refuses together at query time, asked of its own rules."""
    linted = {d.policy.id: d for d in drafts if d.policy is not None}
    drafted = [d.policy for d in drafts if d.policy is not None]
    others = [p for p in home.in_force if p.id not in linted]
    together = drafted + others
    findings = []
    refuse = home.mask_consistency == "refuse"
    for conflict in mask_conflicts(together):
        draft = linted.get(conflict.masked_by.id) or linted.get(conflict.clear_by.id)
        if draft is None:
            continue
        findings.append(
            Finding(
                draft.path,
                _column_line(draft, conflict.column),
                Severity.ERROR if refuse else Severity.WARNING,
                conflict.describe().partition(": ")[0]
                + (
                    ": the connector refuses this member's queries on the dataset "
                    "([policies] mask_consistency = refuse)"
                    if refuse
                    else ": joining the two answers decodes the hashes"
                ),
                f"mask {conflict.column} in both policies or in neither",
            )
        )
    for first, second in _shaping_candidates(drafted, together):
        reason = _refused_together(first, second, home.now)
        if reason is not None:
            draft = linted[first.id]
            findings.append(
                Finding(
                    draft.path,
                    draft.lines.get("id"),
                    Severity.ERROR,
                    f"policy {first.id} and policy {second.id} ({second.path}) are refused "
                    f"together at query time: {reason}",
                    "merge them into one policy, or give them different purposes or members",
                )
            )
    return findings


def _column_line(draft: Draft, column: str) -> int | None:
    for located in draft.masks + draft.allow:
        if located.value == column:
            return located.line
    return draft.lines.get("columns")


def _shaping_candidates(
    drafted: Sequence[UsagePolicy], together: Sequence[UsagePolicy]
) -> list[tuple[UsagePolicy, UsagePolicy]]:
    """Pairs that apply together somewhere (member, dataset, purpose, time) and shape their
    datasets differently: the only ones the decision library can refuse together."""
    pairs = []
    for position, first in enumerate(together):
        if first not in drafted:
            continue
        for second in together[position + 1 :]:
            if (
                set(first.members) & set(second.members)
                and set(first.datasets) & set(second.datasets)
                and set(first.purposes) & set(second.purposes)
                and first.valid_from < second.valid_until
                and second.valid_from < first.valid_until
                and first.shaping.canonical() != second.shaping.canonical()
            ):
                pairs.append((first, second))
    return pairs


def _refused_together(first: UsagePolicy, second: UsagePolicy, now: dt.datetime) -> str | None:
    """The decision library's reason for refusing a request both policies apply to, when
    the first alone would answer it (None: they do not conflict)."""
    member = sorted(set(first.members) & set(second.members))[0]
    dataset = sorted(set(first.datasets) & set(second.datasets))[0]
    purpose = sorted(set(first.purposes) & set(second.purposes))[0]
    start = max(first.valid_from, second.valid_from, now)
    if start >= min(first.valid_until, second.valid_until):
        return None  # they overlapped only in the past
    column = sorted(set(first.columns) & set(second.columns)) or [first.columns[0]]
    request = DecisionRequest(
        member, purpose, (dataset,), {dataset: frozenset(column[:1])}, False, start
    )
    try:
        alone = EmbeddedEngine([first]).decide(request)
        both = EmbeddedEngine([first, second]).decide(request)
    except PolicyEngineError:
        return None
    if both.allow or not alone.allow:
        return None
    return "; ".join(both.reasons)
