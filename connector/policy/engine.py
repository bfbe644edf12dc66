"""The decision point: `decide(request) -> Decision`, by the Rego library in policies/.

Two backends run the same Rego: `embedded` (regopy, in-process; the bundle is compiled once
per policy load) and `opa` (an OPA server over its REST API via opa-python-client). Any
failure to evaluate is a PolicyEngineError, which the service turns into a denial.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from regopy import Interpreter

from connector import REGO_ALLOCATOR_FIRST
from connector.errors import PolicyEngineError
from connector.policy.model import UsagePolicy

log = logging.getLogger(__name__)

REGO_LIBRARY = Path(__file__).resolve().parents[2] / "policies" / "authz.rego"
DECISION = "connector/authz/decision"
CATALOG = "connector/authz/catalog"
DATA_KEY = "usage_policies"


@dataclass(frozen=True)
class DecisionRequest:
    """What the Rego library is asked: who, why, which datasets and columns, when."""

    member: str
    purpose: str
    datasets: tuple[str, ...]
    columns: Mapping[str, frozenset[str]]
    uses_star: bool
    time: dt.datetime

    def as_input(self) -> dict[str, Any]:
        """The request as Rego input."""
        return {
            "member": self.member,
            "purpose": self.purpose,
            "datasets": list(self.datasets),
            "columns": {d: sorted(c) for d, c in self.columns.items()},
            "uses_star": self.uses_star,
            "time_ns": _ns(self.time),
        }


@dataclass(frozen=True)
class Grant:
    """What one dataset may show to a request, and the policies (id, version) granting it."""

    dataset: str
    columns: tuple[str, ...]
    policies: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Decision:
    """Allowed or not, why, what is granted and which obligations apply."""

    allow: bool
    reasons: tuple[str, ...]
    grants: tuple[Grant, ...] = ()
    obligations: Mapping[str, Any] = field(default_factory=dict)

    @property
    def policies(self) -> tuple[tuple[str, int], ...]:
        """The (id, version) of every policy the grants rest on."""
        return tuple(p for grant in self.grants for p in grant.policies)


@dataclass(frozen=True)
class CatalogGrant:
    """A dataset granted to a member now (any purpose), for GetCatalog."""

    dataset: str
    columns: tuple[str, ...]
    purposes: tuple[str, ...]
    policies: tuple[tuple[str, int], ...]
    valid_from: dt.datetime
    valid_until: dt.datetime


class PolicyEngine(Protocol):
    """A decision point over one set of loaded policies."""

    def decide(self, request: DecisionRequest) -> Decision: ...

    def catalog(self, member: str, time: dt.datetime) -> tuple[CatalogGrant, ...]: ...


def _ns(moment: dt.datetime) -> int:
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def _from_ns(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value / 1_000_000_000, dt.UTC)


def _policy_pairs(raw: Any) -> tuple[tuple[str, int], ...]:
    return tuple((str(i), int(v)) for i, v in raw)


def reason_text(reason: Mapping[str, Any]) -> str:
    """The words for one reason object of the Rego library."""
    code = reason.get("code")
    d = reason.get("dataset", "")
    if code == "no_dataset":
        return "the query must read at least one dataset"
    if code == "not_granted":
        return f"no policy grants dataset {d} to you"
    if code == "purpose":
        allowed = ", ".join(map(str, reason.get("allowed", [])))
        if not allowed:
            return (
                f"purpose {reason['purpose']} is not allowed for dataset {d} "
                "(none of your policies for it is in force now)"
            )
        return f"purpose {reason['purpose']} is not allowed for dataset {d} (allowed: {allowed})"
    if code == "expired":
        return f"policy {reason['policy']} for dataset {d} expired on {reason['until']}"
    if code == "not_yet_valid":
        return f"policy {reason['policy']} for dataset {d} is valid only from {reason['from']}"
    if code == "column":
        return f"column {reason['column']} of dataset {d} is not allowed"
    if code == "shaping":
        ids = ", ".join(map(str, reason.get("policies", [])))
        return (
            f"policies {ids} all grant dataset {d} to you for this purpose but with different "
            "masks, row filters or aggregate-only terms; the owner must merge them into one "
            "policy (or give them different purposes)"
        )
    raise PolicyEngineError(
        f"the policy library gave a reason this connector does not know: {code}"
    )


def decision_from(result: Any, requested: Sequence[str] = ()) -> Decision:
    """A Decision from the Rego library's decision document; malformed means deny.

    Checked again here: an allow needs a grant for every requested dataset.
    """
    if not isinstance(result, dict) or not isinstance(result.get("allow"), bool):
        raise PolicyEngineError("the policy library returned no decision")
    try:
        grants = tuple(
            Grant(str(g["dataset"]), tuple(map(str, g["columns"])), _policy_pairs(g["policies"]))
            for g in result.get("grants", [])
        )
        reasons = tuple(sorted(reason_text(r) for r in result.get("reasons", [])))
        obligations = dict(result.get("obligations") or {})
    except (KeyError, TypeError, ValueError, AttributeError):
        raise PolicyEngineError("the policy library returned a malformed decision") from None
    ungranted = sorted(set(requested) - {g.dataset for g in grants})
    allow = result["allow"] and not reasons and bool(grants) and not ungranted
    if not allow and not reasons:
        reasons = tuple(f"no policy grants dataset {d} to you for this purpose" for d in ungranted)
    return Decision(allow, reasons, grants if allow else (), obligations)


def catalog_from(result: Any) -> tuple[CatalogGrant, ...]:
    """CatalogGrants from the Rego library's catalog document."""
    if not isinstance(result, list):
        raise PolicyEngineError("the policy library returned no catalog")
    try:
        return tuple(
            sorted(
                (
                    CatalogGrant(
                        str(e["dataset"]),
                        tuple(map(str, e["columns"])),
                        tuple(map(str, e["purposes"])),
                        _policy_pairs(e["policies"]),
                        _from_ns(int(e["valid_from_ns"])),
                        _from_ns(int(e["valid_until_ns"])),
                    )
                    for e in result
                ),
                key=lambda g: g.dataset,
            )
        )
    except (KeyError, TypeError, ValueError):
        raise PolicyEngineError("the policy library returned a malformed catalog") from None


def policy_data(policies: Sequence[UsagePolicy]) -> dict[str, Any]:
    """The data document the Rego library reads."""
    return {DATA_KEY: {"items": [p.as_rego_data() for p in policies], "index": _index(policies)}}


def _index(policies: Sequence[UsagePolicy]) -> dict[str, dict[str, list[int]]]:
    """member -> dataset -> positions of the policies naming both, so that Rego reads only
    the requester's policies (regopy's cost grows faster than linearly with what it scans)."""
    index: dict[str, dict[str, list[int]]] = {}
    for position, policy in enumerate(policies):
        for member in policy.members:
            for dataset in policy.datasets:
                index.setdefault(member, {}).setdefault(dataset, []).append(position)
    return index


def rego_library() -> str:
    """The text of the Rego decision library."""
    try:
        return REGO_LIBRARY.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyEngineError(f"cannot read the Rego library {REGO_LIBRARY}: {exc}") from None


class EmbeddedEngine:
    """Evaluates the Rego library in-process with regopy; compiled once per policy load."""

    def __init__(self, policies: Sequence[UsagePolicy], library: str | None = None) -> None:
        if not REGO_ALLOCATOR_FIRST:
            log.warning(
                "a C++ library was loaded before the connector package: each Rego decision "
                "will keep about 20 KB of memory; import connector before duckdb, pyarrow or "
                "grpc (as `connector serve` does)"
            )
        builder = Interpreter()
        try:
            builder.add_module("authz.rego", library or rego_library())
            builder.add_data(policy_data(policies))
            self._bundle = builder.build(None, [DECISION, CATALOG])
        except Exception as exc:
            raise PolicyEngineError(f"the Rego library does not compile: {exc}") from None
        if not self._bundle.ok():
            raise PolicyEngineError("the Rego library does not compile")

    def _evaluate(self, entrypoint: str, document: dict[str, Any]) -> Any:
        # A fresh interpreter per call: the compiled bundle is shared, the input is not.
        interpreter = Interpreter()
        try:
            interpreter.set_input(document)
            output = interpreter.query_bundle_entrypoint(self._bundle, entrypoint)
            if not output.ok():
                raise PolicyEngineError(f"policy evaluation failed: {output}")
            results = json.loads(str(output))
        except PolicyEngineError:
            raise
        except Exception as exc:
            raise PolicyEngineError(f"policy evaluation failed: {exc}") from None
        return _first_expression(results)

    def decide(self, request: DecisionRequest) -> Decision:
        """The decision for one request."""
        return decision_from(self._evaluate(DECISION, request.as_input()), request.datasets)

    def catalog(self, member: str, time: dt.datetime) -> tuple[CatalogGrant, ...]:
        """What is granted to member at time, any purpose."""
        return catalog_from(self._evaluate(CATALOG, {"member": member, "time_ns": _ns(time)}))


def _first_expression(results: Any) -> Any:
    """The value of a regopy entrypoint query ({"expressions": [value]} or a list of those)."""
    if isinstance(results, list):
        results = results[0] if results else {}
    if isinstance(results, dict) and results.get("expressions"):
        return results["expressions"][0]
    raise PolicyEngineError("policy evaluation returned no result")


class OpaServerEngine:
    """Evaluates the same Rego library in an OPA server (REST API, opa-python-client)."""

    def __init__(self, policies: Sequence[UsagePolicy], url: str, timeout: float = 2.0) -> None:
        from opa_client import OpaClient

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyEngineError(f"opa_url {url!r} must look like http://127.0.0.1:8181")
        self._client = OpaClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 8181),
            ssl=parts.scheme == "https",
            timeout=timeout,
        )
        try:
            self._client.update_policy_from_string(rego_library(), "connector-authz")
            self._client.update_or_create_data(policy_data(policies)[DATA_KEY], DATA_KEY)
        except Exception as exc:
            raise PolicyEngineError(f"cannot load the policies into OPA at {url}: {exc}") from None

    def _query(self, rule: str, document: dict[str, Any]) -> Any:
        try:
            answer = self._client.query_rule(document, "connector/authz", rule)
        except Exception as exc:
            raise PolicyEngineError(f"the OPA server did not answer: {exc}") from None
        if not isinstance(answer, dict) or "result" not in answer:
            raise PolicyEngineError("the OPA server returned no result (is the library loaded?)")
        return answer["result"]

    def decide(self, request: DecisionRequest) -> Decision:
        """The decision for one request."""
        return decision_from(self._query("decision", request.as_input()), request.datasets)

    def catalog(self, member: str, time: dt.datetime) -> tuple[CatalogGrant, ...]:
        """What is granted to member at time, any purpose."""
        return catalog_from(self._query("catalog", {"member": member, "time_ns": _ns(time)}))


def build_engine(kind: str, policies: Sequence[UsagePolicy], *, opa_url: str = "") -> PolicyEngine:
    """The engine named in connector.toml over these policies."""
    if kind == "embedded":
        return EmbeddedEngine(policies)
    if kind == "opa":
        return OpaServerEngine(policies, opa_url)
    raise PolicyEngineError(f"unknown policy engine {kind!r}; use 'embedded' or 'opa'")
