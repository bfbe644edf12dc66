"""The usage-policy file format: parse, validate, normalise. Policy files are hostile input.

Every error names the file and the line. Unknown keys are refused: a term this version
would accept but not enforce would share more than legal intended.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from connector.directory import ROLE
from connector.errors import PolicyError
from connector.names import COLUMN_NAME, DATASET_NAME, MEMBER_ID, POLICY_ID, PURPOSE
from connector.policy.terms import (
    AGGREGATE_ONLY_KEYS,
    ROWS_KEYS,
    read_aggregate_only,
    read_masks,
    read_row_filters,
)
from connector.policy.yaml_strict import ANY_TEXT, PolicyReader, compose_strict
from connector.recent import RecentlyUsed
from connector.shaping import Shaping

POLICY_FORMAT = 1
MAX_POLICY_BYTES = 1024 * 1024

# key -> nested keys (None: a leaf). The only keys this connector version enforces.
SCHEMA: dict[str, dict[str, None] | None] = {
    "format": None,
    "id": None,
    "version": None,
    "description": None,
    "datasets": None,
    "grantees": {"members": None, "roles": None},
    "purposes": None,
    "valid": {"from": None, "until": None},
    "columns": {"allow": None, "mask": None},
    "rows": ROWS_KEYS,
    "aggregate_only": AGGREGATE_ONLY_KEYS,
    "obligations": {"delete_within_days": None, "attribution": None, "terms": None},
    "limits": {
        "max_rows_per_query": None,
        "queries_per_day": None,
        "rows_per_day": None,
        "max_bytes_per_query": None,
        "bytes_per_day": None,
    },
}
REQUIRED = ("id", "version", "description", "datasets", "grantees", "purposes", "valid", "columns")


@dataclass(frozen=True)
class Obligations:
    """What the peer takes on by receiving data; sent with every answer, not enforced here."""

    delete_within_days: int = 0  # 0: no deletion deadline
    attribution: str = ""
    terms: tuple[str, ...] = ()


@dataclass(frozen=True)
class Limits:
    """How much a grantee may take (0: no limit of this kind); bytes are Arrow IPC bytes sent."""

    max_rows_per_query: int = 0
    queries_per_day: int = 0
    rows_per_day: int = 0
    max_bytes_per_query: int = 0
    bytes_per_day: int = 0

    @classmethod
    def tightest(cls, limits: Iterable[Limits]) -> Limits:
        """Each kind of limit at its tightest over several policies (0 where none sets it)."""
        every = list(limits)
        return cls(
            max_rows_per_query=tightest(lim.max_rows_per_query for lim in every),
            queries_per_day=tightest(lim.queries_per_day for lim in every),
            rows_per_day=tightest(lim.rows_per_day for lim in every),
            max_bytes_per_query=tightest(lim.max_bytes_per_query for lim in every),
            bytes_per_day=tightest(lim.bytes_per_day for lim in every),
        )

    @property
    def limits_rows(self) -> bool:
        """True when a row limit applies (rows packed into one row would bypass it)."""
        return bool(self.max_rows_per_query or self.rows_per_day)


def tightest(limits: Iterable[int]) -> int:
    """The smallest positive limit (0 when none is set)."""
    return min((n for n in limits if n > 0), default=0)


@dataclass(frozen=True)
class UsagePolicy:
    """A validated usage policy, identifiers lower-cased, times in UTC."""

    id: str
    version: int
    description: str
    datasets: tuple[str, ...]
    members: tuple[str, ...]
    purposes: tuple[str, ...]
    valid_from: dt.datetime
    valid_until: dt.datetime
    columns_allow: tuple[str, ...]
    path: Path
    sha256: str
    obligations: Obligations = Obligations()
    limits: Limits = Limits()
    shaping: Shaping = field(default_factory=Shaping)
    # Roles granted (grantees.roles): the connector resolves them to members through the
    # member directory it holds (policy/registry.py); with no directory they grant nobody.
    roles: tuple[str, ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the policy shows, in the clear or masked."""
        return self.columns_allow + tuple(c for c, _ in self.shaping.masks)

    def as_rego_data(self) -> dict[str, Any]:
        """The policy as the Rego library reads it (JSON-able)."""
        return {
            "id": self.id,
            "version": self.version,
            "datasets": list(self.datasets),
            "members": list(self.members),
            "roles": list(self.roles),
            "purposes": list(self.purposes),
            "valid_from_ns": ns(self.valid_from),
            "valid_until_ns": ns(self.valid_until),
            "valid_from": self.valid_from.isoformat(),
            "valid_until": self.valid_until.isoformat(),
            "columns": list(self.columns),
            "shaping": self.shaping.canonical(),
            "delete_within_days": self.obligations.delete_within_days,
            "attribution": self.obligations.attribution,
            "terms": list(self.obligations.terms),
        }


def ns(moment: dt.datetime) -> int:
    """A moment as whole nanoseconds since the epoch: how policies' validity and requests'
    times meet in the decision library (one encoding for both, or boundaries would drift)."""
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def from_ns(value: int) -> dt.datetime:
    """The moment ns(moment) encodes (UTC)."""
    return dt.datetime.fromtimestamp(value / 1_000_000_000, dt.UTC)


# The policies last parsed, by the sha256 of their files' bytes: a folder is read at every
# start and reload, by the offline tools more than once, mostly unchanged, and the
# pure-Python YAML reading costs milliseconds a file. Only valid policies are kept.
PARSED: RecentlyUsed[str, UsagePolicy] = RecentlyUsed(256)


def parse_policy(path: Path, text: bytes | None = None) -> UsagePolicy:
    """Parse and validate a policy file; PolicyError names the file, the line and the fix."""
    data = text if text is not None else _read(path)
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"larger than {MAX_POLICY_BYTES} bytes", path=str(path))
    sha256 = hashlib.sha256(data).hexdigest()
    known = PARSED.get(sha256)
    if known is not None:
        return known if known.path == path else replace(known, path=path)
    root = compose_strict(path, data)
    if root is None:
        raise PolicyError("the file is empty", path=str(path))
    policy = policy_from_node(path, root, sha256)
    PARSED.put(sha256, policy)
    return policy


def policy_from_node(path: Path, root: yaml.Node, sha256: str) -> UsagePolicy:
    """The policy in a composed YAML document (checked as parse_policy checks it)."""
    reader = PolicyReader(path)
    top = reader.mapping(root, "the policy", SCHEMA)
    missing = [k for k in REQUIRED if k not in top]
    if missing:
        raise reader.fail(root, f"missing key(s): {', '.join(missing)}")
    return _policy(reader, top, path, sha256)


def _read(path: Path) -> bytes:
    return read_limited(path, MAX_POLICY_BYTES)


def read_limited(path: Path, limit: int) -> bytes:
    """The file's bytes; PolicyError when it cannot be read or is larger than limit bytes."""
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)  # never more: the file may be huge
    except OSError as exc:
        raise PolicyError(f"cannot read: {exc.strerror}", path=str(path)) from None
    if len(data) > limit:
        raise PolicyError(f"larger than {limit} bytes", path=str(path))
    return data


def _policy(reader: PolicyReader, top: dict[str, Any], path: Path, sha256: str) -> UsagePolicy:
    if "format" in top:
        node = top["format"][1]
        fmt = reader.scalar(node, "format")
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise reader.fail(node, "format must be a whole number, 1 for this version")
        if fmt > POLICY_FORMAT:
            raise reader.fail(
                node, f"format {fmt} is written for a newer connector; upgrade the connector"
            )
    version_node = top["version"][1]
    version = reader.scalar(version_node, "version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise reader.fail(version_node, "version must be a whole number of at least 1")
    grantees = reader.mapping(top["grantees"][1], "grantees", SCHEMA["grantees"] or {})
    if "members" not in grantees and "roles" not in grantees:
        raise reader.fail(
            top["grantees"][1],
            "grantees needs members: [member-id, ...] or roles: [role, ...] (roles are "
            "resolved through the data space's member directory)",
        )
    valid = reader.mapping(top["valid"][1], "valid", SCHEMA["valid"] or {})
    for key in ("from", "until"):
        if key not in valid:
            raise reader.fail(top["valid"][1], f"valid needs '{key}'")
    start = reader.moment(valid["from"][1], "valid.from")
    end = reader.moment(valid["until"][1], "valid.until")
    if end <= start:
        raise reader.fail(valid["until"][1], "valid.until must be later than valid.from")
    columns = reader.mapping(top["columns"][1], "columns", SCHEMA["columns"] or {})
    if "allow" not in columns:
        raise reader.fail(top["columns"][1], "columns needs allow: [column, ...]")
    lower = _lowered(reader)
    allow = lower(columns["allow"][1], "columns.allow", COLUMN_NAME)
    masks = read_masks(reader, columns["mask"][1], allow) if "mask" in columns else ()
    return UsagePolicy(
        id=reader.text(top["id"][1], "id", POLICY_ID),
        version=version,
        description=reader.text(top["description"][1], "description", ANY_TEXT),
        datasets=lower(top["datasets"][1], "datasets", DATASET_NAME),
        members=reader.text_list(grantees["members"][1], "grantees.members", MEMBER_ID)
        if "members" in grantees
        else (),
        roles=reader.text_list(grantees["roles"][1], "grantees.roles", ROLE)
        if "roles" in grantees
        else (),
        purposes=reader.text_list(top["purposes"][1], "purposes", PURPOSE),
        valid_from=start,
        valid_until=end,
        columns_allow=allow,
        path=path,
        sha256=sha256,
        limits=_limits(reader, top["limits"][1]) if "limits" in top else Limits(),
        obligations=_obligations(reader, top["obligations"][1])
        if "obligations" in top
        else Obligations(),
        shaping=Shaping(
            masks=masks,
            filters=read_row_filters(reader, top["rows"][1]) if "rows" in top else (),
            **(
                read_aggregate_only(reader, top["aggregate_only"][1], allow, masks)
                if "aggregate_only" in top
                else {}
            ),
        ),
    )


def _limits(reader: PolicyReader, node: yaml.Node) -> Limits:
    found = reader.mapping(node, "limits", SCHEMA["limits"] or {})
    values = {}
    for key, (_, value_node) in found.items():
        value = reader.scalar(value_node, f"limits.{key}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise reader.fail(value_node, f"limits.{key} must be a whole number, at least 1")
        values[key] = value
    return Limits(**values)


def _obligations(reader: PolicyReader, node: yaml.Node) -> Obligations:
    found = reader.mapping(node, "obligations", SCHEMA["obligations"] or {})
    days = 0
    if "delete_within_days" in found:
        days_node = found["delete_within_days"][1]
        days = reader.scalar(days_node, "obligations.delete_within_days")
        if not isinstance(days, int) or isinstance(days, bool) or days < 1:
            raise reader.fail(
                days_node,
                "obligations.delete_within_days must be a whole number of days, at least 1",
            )
    attribution = (
        reader.text(found["attribution"][1], "obligations.attribution")
        if "attribution" in found
        else ""
    )
    terms = (
        reader.text_list(found["terms"][1], "obligations.terms", ANY_TEXT)
        if "terms" in found
        else ()
    )
    return Obligations(days, attribution, terms)


def _lowered(reader: PolicyReader) -> Any:
    def read(node: yaml.Node, where: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                # ASCII only: str.lower() maps some non-ASCII letters (the Kelvin sign) to ASCII.
                if isinstance(item, yaml.ScalarNode) and item.value.isascii():
                    item.value = item.value.lower()
        return reader.text_list(node, where, pattern)

    return read
