"""What `policy lint` reads of a draft, leniently: its keys, names and values with their
lines, and the Finding each mistake becomes (lint.py runs the rules)."""

from __future__ import annotations

import datetime as dt
import difflib
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from connector.directory import Directory
from connector.errors import PolicyError
from connector.policy.model import (
    REQUIRED,
    UsagePolicy,
)
from connector.policy.terms import NOISE_KEYS
from connector.policy.versions import VersionRecord
from connector.policy.yaml_strict import PolicyReader
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
    directory: Directory | None = None  # the data space's member directory, when held
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
    roles: list[Located] = field(default_factory=list)
    purposes: list[Located] = field(default_factory=list)
    allow: list[Located] = field(default_factory=list)
    masks: list[Located] = field(default_factory=list)
    filters: list[tuple[Located, list[Located]]] = field(default_factory=list)
    policy: UsagePolicy | None = None
    sha256: str = ""


def did_you_mean(name: str, known: Iterable[str]) -> str | None:
    """The known name closest to a misspelt one, if any is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return close[0] if close else None


def finding_from_error(path: Path, error: PolicyError) -> Finding:
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


def key_findings(
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
            findings += key_findings(path, value_node, nested, dotted)
        if dotted == "rows.where" and isinstance(value_node, yaml.MappingNode):
            for column_node, bounds in value_node.value:
                if isinstance(bounds, yaml.MappingNode):
                    inner = f"rows.where.{getattr(column_node, 'value', '?')}"
                    findings += key_findings(path, bounds, dict.fromkeys(RANGE_OPERATORS), inner)
    node.value = kept
    required = REQUIRED if not where else _REQUIRED_INSIDE.get(where, ())
    present = {k.value for k, _ in kept if isinstance(k, yaml.ScalarNode)}
    if where == "grantees" and "roles" in present:
        required = ()  # members or roles: either grants
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


def read_draft(draft: Draft, root: yaml.MappingNode) -> None:
    """Fill draft with what can be read of each part, leniently, with lines."""
    reader = PolicyReader(draft.path)
    top = children(root)
    for key, (key_node, _) in top.items():
        draft.lines[key] = _line(key_node)
    draft.datasets = _names(top.get("datasets"), lower=True)
    draft.purposes = _names(top.get("purposes"), lower=False)
    grantees = children(top.get("grantees"))
    draft.members = _names(grantees.get("members"), lower=False)
    draft.roles = _names(grantees.get("roles"), lower=False)
    columns = children(top.get("columns"))
    draft.allow = _names(columns.get("allow"), lower=True)
    draft.masks = [Located(_lower(str(k.value)), _line(k)) for k, _ in _pairs(columns.get("mask"))]
    for name, (key_node, _) in columns.items():
        draft.lines[f"columns.{name}"] = _line(key_node)
    valid = children(top.get("valid"))
    for name, (key_node, _) in valid.items():
        draft.lines[f"valid.{name}"] = _line(key_node)
    where = children(children(top.get("rows")).get("where"))
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


def children(
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
