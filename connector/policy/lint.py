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
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from connector.directory import Directory
from connector.errors import PolicyError
from connector.policy.fit import value_fits
from connector.policy.lint_across import conflict_findings, duplicate_ids, version_findings
from connector.policy.lint_draft import (
    Draft,
    Finding,
    HomeFacts,
    Located,
    Severity,
    children,
    did_you_mean,
    finding_from_error,
    key_findings,
    read_draft,
)
from connector.policy.model import (
    MAX_POLICY_BYTES,
    SCHEMA,
    policy_from_node,
    read_limited,
)
from connector.policy.yaml_strict import PolicyReader, compose_strict
from connector.store import DatasetInfo


def lint_files(paths: Sequence[Path], home: HomeFacts) -> list[Finding]:
    """Every finding for the files, then those between them and the home's policies."""
    findings: list[Finding] = []
    drafts = []
    for path in paths:
        draft, found = lint_file(path, home)
        findings += found
        if draft is not None:
            drafts.append(draft)
    findings += duplicate_ids(drafts)
    findings += version_findings(drafts, home)
    findings += conflict_findings(drafts, home)
    return findings


def lint_file(path: Path, home: HomeFacts) -> tuple[Draft | None, list[Finding]]:
    """The findings of one file alone, and what was read of it (None: not YAML at all)."""
    try:
        data = read_limited(path, MAX_POLICY_BYTES)
        root = compose_strict(path, data)
    except PolicyError as error:
        return None, [finding_from_error(path, error)]
    if not isinstance(root, yaml.MappingNode):
        fix = "start from `connector policy new`, which writes a complete policy"
        message = "the file is empty" if root is None else "a policy must be a mapping of keys"
        return None, [Finding(path, 1, Severity.ERROR, message, fix)]
    draft = Draft(path, sha256=hashlib.sha256(data).hexdigest())
    findings = key_findings(path, root, SCHEMA, "")
    read_draft(draft, root)
    findings += _data_findings(draft, home)
    findings += _validity_findings(draft, root, home.now)
    findings += _grantee_findings(draft, home)
    findings += _purpose_findings(draft)
    try:
        draft.policy = policy_from_node(path, root, draft.sha256)
    except PolicyError as error:
        # Reported unless a finding of lint's own already says it better, on the same line.
        if all(f.line != error.line for f in findings if f.severity is Severity.ERROR):
            findings.append(finding_from_error(path, error))
    return draft, sorted(findings, key=lambda f: f.line or 0)


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
    valid = children(children(root).get("valid"))
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
    """Grantees this home knows cannot use it: itself, revoked members, and (when the home
    holds the data space's member directory) members and roles it does not list."""
    findings = _directory_findings(draft, home.directory) if home.directory else []
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


def _directory_findings(draft: Draft, directory: Directory) -> list[Finding]:
    """Grantees the member directory does not know: a typo, or a member not yet admitted."""
    findings = []
    known = [m.id for m in directory.members]
    for member in draft.members:
        if directory.member(str(member.value)) is None:
            close = did_you_mean(str(member.value), known)
            findings.append(
                Finding(
                    draft.path,
                    member.line,
                    Severity.WARNING,
                    f"grantee {member.value} is not a member in the data space's directory "
                    f"(version {directory.version})",
                    (f"did you mean '{close}'? " if close else "")
                    + "check the id with `connector members`",
                )
            )
    roles = directory.roles()
    for role in draft.roles:
        if str(role.value) not in roles:
            findings.append(
                Finding(
                    draft.path,
                    role.line,
                    Severity.WARNING,
                    f"no member of the data space's directory (version {directory.version}) "
                    f"has role {role.value}: the grant reaches nobody for now",
                    f"roles held: {', '.join(roles) or 'none'}",
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
