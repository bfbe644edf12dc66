"""The decision point: `decide(request) -> Decision`, by the Rego library in policies/.

Two backends run the same Rego: `embedded` (regopy, in-process; the bundle is compiled once
per policy load) and `opa` (an OPA server over its REST API via opa-python-client). Any
failure to evaluate is a PolicyEngineError, which the service turns into a denial.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from regopy import Bundle, Interpreter

from connector import ONE_CPP_ALLOCATOR
from connector.canonical import canonical_bytes
from connector.errors import PolicyEngineError
from connector.policy.answers import AnswerFault, catalog_grant_fault, decision_grant_fault
from connector.policy.model import UsagePolicy, from_ns, ns
from connector.recent import RecentlyUsed
from connector.refusals import column_refusal

log = logging.getLogger(__name__)
T = TypeVar("T")

REGO_LIBRARY = Path(__file__).resolve().parent / "authz.rego"
DECISION = "connector/authz/decision"
CATALOG = "connector/authz/catalog"
DATA_KEY = "usage_policies"


@dataclass(frozen=True)
class OpaConnection:
    """How to reach an OPA server: its URL, a bearer token, a CA file for HTTPS, and the
    names this connector writes under there (unique per data space and member)."""

    url: str
    namespace: str
    token: str = ""
    ca_file: str = ""
    timeout: float = 2.0


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
            "time_ns": ns(self.time),
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


def _policy_pairs(raw: Any) -> tuple[tuple[str, int], ...]:
    return tuple((str(i), int(v)) for i, v in raw)


def reason_text(reason: Mapping[str, Any], requested: Sequence[str] = ()) -> str:
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
        return column_refusal(str(reason["column"]), requested or [d])
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


def decision_from(result: Any, requested: Sequence[str], revision: str) -> Decision:
    """A Decision from the Rego library's decision document; malformed means deny.

    Checked again here: the answer comes from this revision of the policies, and an allow
    needs a grant for every requested dataset.
    """
    if not isinstance(result, dict) or not isinstance(result.get("allow"), bool):
        raise PolicyEngineError("the policy library returned no decision")
    _check_revision(result, revision)
    try:
        grants = tuple(
            Grant(str(g["dataset"]), tuple(map(str, g["columns"])), _policy_pairs(g["policies"]))
            for g in result.get("grants", [])
        )
        reasons = tuple(sorted({reason_text(r, requested) for r in result.get("reasons", [])}))
        obligations = dict(result.get("obligations") or {})
    except (KeyError, TypeError, ValueError, AttributeError):
        raise PolicyEngineError("the policy library returned a malformed decision") from None
    ungranted = sorted(set(requested) - {g.dataset for g in grants})
    allow = result["allow"] and not reasons and bool(grants) and not ungranted
    if not allow and not reasons:
        reasons = tuple(f"no policy grants dataset {d} to you for this purpose" for d in ungranted)
    return Decision(allow, reasons, grants if allow else (), obligations)


def catalog_from(result: Any, revision: str) -> tuple[CatalogGrant, ...]:
    """CatalogGrants from the Rego library's catalog document (of this revision)."""
    if not isinstance(result, dict) or not isinstance(result.get("entries"), list):
        raise PolicyEngineError("the policy library returned no catalog")
    _check_revision(result, revision)
    try:
        return tuple(
            sorted(
                (
                    CatalogGrant(
                        str(e["dataset"]),
                        tuple(map(str, e["columns"])),
                        tuple(map(str, e["purposes"])),
                        _policy_pairs(e["policies"]),
                        from_ns(int(e["valid_from_ns"])),
                        from_ns(int(e["valid_until_ns"])),
                    )
                    for e in result["entries"]
                ),
                key=lambda g: g.dataset,
            )
        )
    except (KeyError, TypeError, ValueError):
        raise PolicyEngineError("the policy library returned a malformed catalog") from None


class UntrustedAnswer(PolicyEngineError):
    """The engine answered from other policies than the ones this connector gave it."""


def _check_revision(result: Mapping[str, Any], revision: str) -> None:
    if result.get("revision") != revision:
        raise UntrustedAnswer(
            f"the policy engine answered from policies of revision {result.get('revision')!r}, "
            f"not from this connector's revision {revision!r} (another writer changed them?)"
        )


def policy_data(policies: Sequence[UsagePolicy]) -> dict[str, Any]:
    """The data document the Rego library reads, with the revision its answers echo."""
    items = [p.as_rego_data() for p in policies]
    return {DATA_KEY: {"items": items, "index": _index(policies), "revision": data_revision(items)}}


def data_revision(items: Sequence[Mapping[str, Any]]) -> str:
    """The revision of a set of normalised policies: a hash of their canonical JSON."""
    return hashlib.sha256(canonical_bytes(list(items))).hexdigest()[:32]


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
        raise PolicyEngineError(
            f"cannot read the Rego library {REGO_LIBRARY}: {exc.strerror}; the connector's "
            "installation is incomplete: reinstall it"
        ) from None


COMPILED: RecentlyUsed[tuple[str, str], Bundle] = RecentlyUsed(4)


def compiled_bundle(
    library: str, data: Mapping[str, Any], kept: RecentlyUsed[tuple[str, str], Bundle] = COMPILED
) -> Bundle:
    """library compiled with data (whose revision names its policies), kept for the last few
    sets: regopy takes about 25 ms of CPU to compile, and a reload of unchanged policies
    (SIGHUP, a file touched, a certificate rotated) or a second server of this process over
    the same policies gets the bundle it made before. A bundle is only read when evaluated."""
    key = (hashlib.sha256(library.encode()).hexdigest(), str(data[DATA_KEY]["revision"]))
    bundle = kept.get(key)
    if bundle is None:
        bundle = _compile(library, data)
        kept.put(key, bundle)
    return bundle


def _compile(library: str, data: Mapping[str, Any]) -> Bundle:
    builder = Interpreter()
    try:
        builder.add_module("authz.rego", library)
        builder.add_data(data)
        bundle = builder.build(None, [DECISION, CATALOG])
    except Exception as exc:
        raise PolicyEngineError(f"the Rego library does not compile: {exc}") from None
    if not bundle.ok():
        raise PolicyEngineError("the Rego library does not compile")
    return bundle


class EmbeddedEngine:
    """Evaluates the Rego library in-process with regopy; compiled once per policy load."""

    def __init__(self, policies: Sequence[UsagePolicy], library: str | None = None) -> None:
        if not ONE_CPP_ALLOCATOR:
            log.warning(
                "regopy was imported before the connector package: its C++ memory may be "
                "freed to another allocator and kept, about 20 KB a Rego decision; import "
                "connector before regopy (as `connector serve` does)"
            )
        text = library or rego_library()  # a missing file is not a compile error
        data = policy_data(policies)
        self.revision = str(data[DATA_KEY]["revision"])
        self._bundle = compiled_bundle(text, data)

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
        return decision_from(
            self._evaluate(DECISION, request.as_input()), request.datasets, self.revision
        )

    def catalog(self, member: str, time: dt.datetime) -> tuple[CatalogGrant, ...]:
        """What is granted to member at time, any purpose."""
        return catalog_from(
            self._evaluate(CATALOG, {"member": member, "time_ns": ns(time)}), self.revision
        )


def _first_expression(results: Any) -> Any:
    """The value of a regopy entrypoint query ({"expressions": [value]} or a list of those)."""
    if isinstance(results, list):
        results = results[0] if results else {}
    if isinstance(results, dict) and results.get("expressions"):
        return results["expressions"][0]
    raise PolicyEngineError("policy evaluation returned no result")


class CheckedEngine:
    """An engine whose answers are obeyed only as far as the signed policies they name
    allow (policy/answers.py). After one answer that goes beyond them, every answer is a
    denial until the policies are loaded again (a new engine, a new push to OPA)."""

    def __init__(self, inner: PolicyEngine, policies: Sequence[UsagePolicy]) -> None:
        self._inner = inner
        self._by_id = {p.id: p for p in policies}
        self._fault = ""

    def _answer(self, ask: Callable[[], T]) -> T:
        self._check_trusted()
        try:
            return ask()
        except UntrustedAnswer as exc:
            raise self._distrust(AnswerFault(exc.message)) from None

    def _distrust(self, fault: AnswerFault) -> PolicyEngineError:
        self._fault = fault.detail
        log.error(
            "the policy engine answered beyond the signed policies (%s); denying every request "
            "until the policies are loaded again (SIGHUP, or a change in policies/)",
            fault.detail,
        )
        return PolicyEngineError("the policy engine gave an answer this connector cannot trust")

    def _check_trusted(self) -> None:
        if self._fault:
            raise PolicyEngineError("the policy engine is not trusted until the policies reload")

    def decide(self, request: DecisionRequest) -> Decision:
        """The inner engine's decision, denied when it goes beyond the signed policies."""
        decision = self._answer(lambda: self._inner.decide(request))
        for grant in decision.grants:
            fault = (
                AnswerFault(f"a grant of {grant.dataset}, which the query does not read")
                if grant.dataset not in request.datasets
                else decision_grant_fault(
                    grant, request.member, request.purpose, self._by_id, request.time
                )
            )
            if fault is not None:
                raise self._distrust(fault)
        return decision

    def catalog(self, member: str, time: dt.datetime) -> tuple[CatalogGrant, ...]:
        """The inner engine's catalog, refused when it goes beyond the signed policies."""
        entries = self._answer(lambda: self._inner.catalog(member, time))
        for entry in entries:
            fault = catalog_grant_fault(entry, member, entry.purposes, self._by_id, time)
            if fault is not None:
                raise self._distrust(fault)
        return entries
