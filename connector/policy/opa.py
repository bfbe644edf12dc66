"""The decision library evaluated by an OPA server (REST API, via opa-python-client), and
the choice between it and the embedded engine (`build_engine`).

Several connectors may share one OPA server: each writes the library under its own package
and its policies under its own data path, both named by a namespace derived from its data
space and member id, and checks after every push that OPA holds its revision. Every answer
echoes that revision; the caller also checks each answer against the signed policies it
names (policy/answers.py), so an OPA that says "allow" beyond them is not obeyed.

One OpaLink per connector outlives the engines of successive policy loads: it knows what was
pushed last and whether OPA holds it and answers. While OPA is out of reach, answers
nonsense or holds other policies, every request is refused as unavailable; `probe()` (run
by the server's upkeep thread) pushes again until OPA holds the policies, so a restarted OPA
(which has lost everything pushed) is filled again without a reload.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from connector.config import Settings
from connector.errors import ConfigError, PolicyEngineError, PolicyEngineUnavailable
from connector.policy.engine import (
    DATA_KEY,
    CatalogGrant,
    CheckedEngine,
    Decision,
    DecisionRequest,
    EmbeddedEngine,
    OpaConnection,
    PolicyEngine,
    UntrustedAnswer,
    catalog_from,
    decision_from,
    policy_data,
    rego_library,
)
from connector.policy.model import UsagePolicy, ns

log = logging.getLogger(__name__)
T = TypeVar("T")

LIBRARY_PACKAGE = "package connector.authz"
LIBRARY_DATA = "data.usage_policies"
# How often a reachable OPA that holds the policies is checked again (it may have been
# restarted empty); one that does not is retried on every probe.
RECHECK_SECONDS = 5.0
# A harmless question whose answer shows that OPA evaluates this connector's library over
# its policies: no dataset, so the library must deny, echoing the revision.
_PROBE_INPUT: dict[str, Any] = {
    "member": "",
    "purpose": "",
    "datasets": [],
    "columns": {},
    "uses_star": False,
    "time_ns": 0,
}


def opa_namespace(dataspace: str, member_id: str) -> str:
    """The OPA names of one connector: a Rego-safe word unique to its data space and member."""
    digest = hashlib.sha256(f"{dataspace}\n{member_id}".encode()).hexdigest()[:20]
    return f"c{digest}"


def namespaced_library(namespace: str) -> str:
    """The Rego library with its package and data path moved under namespace."""
    text = rego_library()
    if LIBRARY_PACKAGE not in text or LIBRARY_DATA not in text:
        raise PolicyEngineError("the Rego library does not declare the expected package")
    return text.replace(LIBRARY_PACKAGE, f"package connector.{namespace}.authz", 1).replace(
        LIBRARY_DATA, f"data.connector_data.{namespace}.{DATA_KEY}"
    )


@dataclass(frozen=True)
class _Push:
    """What one policy load puts into OPA."""

    revision: str
    data: dict[str, Any]


class OpaLink:
    """This connector's OPA server: the last push, whether OPA holds it and answers, and a
    listener told when that changes (the health service)."""

    def __init__(self, opa: OpaConnection) -> None:
        from opa_client import OpaClient

        parts = urlsplit(opa.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyEngineError(f"opa_url {opa.url!r} must look like http://127.0.0.1:8181")
        if opa.ca_file and parts.scheme != "https":
            raise PolicyEngineError("opa_ca is set but opa_url is not https://")
        self.address = opa.url
        self._namespace = opa.namespace
        self.package = f"connector/{opa.namespace}/authz"
        self._data_path = f"connector_data/{opa.namespace}/{DATA_KEY}"
        self._library = namespaced_library(opa.namespace)
        # opa-python-client hands `ssl` to requests as `verify`: a CA file path checks the
        # server against that CA only; True uses the system's CAs.
        verify: bool | str = opa.ca_file or parts.scheme == "https"
        self._client = OpaClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 8181),
            ssl=verify,
            token=opa.token or None,
            timeout=opa.timeout,
            retries=0,  # probe() is the retry; a request must not wait on back-offs
        )
        if opa.ca_file:
            # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace a session's CA file;
            # the configured OPA CA must be the one that counts.
            self._client._session.trust_env = False
        self._lock = threading.Lock()
        self._wanted: _Push | None = None
        self._held = ""  # the revision OPA was last seen to hold and answer from
        self._fault = "not contacted yet"
        self._checked = 0.0
        self.on_change: Callable[[bool], None] | None = None

    @property
    def available(self) -> bool:
        """Whether OPA holds the policies last pushed and answers from them."""
        return self._wanted is not None and self._held == self._wanted.revision

    def push(self, revision: str, data: dict[str, Any]) -> None:
        """Put a new policy load into OPA (now, and again by probe() until OPA holds it)."""
        with self._lock:
            self._wanted = _Push(revision, data)
            self._held = ""
            self._push_wanted()
        self._announce()

    def probe(self) -> bool:
        """Check that OPA holds and answers from the last push, pushing again if not."""
        with self._lock:
            recheck = time.monotonic() - self._checked >= RECHECK_SECONDS
            if self._wanted is not None and (not self.available or recheck):
                self._check_or_push()
        self._announce()
        return self.available

    def query(self, rule: str, document: dict[str, Any], revision: str) -> Any:
        """The result of one rule for an engine of revision; PolicyEngineUnavailable when OPA
        does not hold that revision or does not answer."""
        if self._wanted is None or self._wanted.revision != revision:
            raise PolicyEngineUnavailable(
                "the policies were reloaded while this request was decided; retry"
            )
        for _ in range(2):
            if not self.available:
                raise self.unavailable()
            try:
                answer = self._client.query_rule(document, self.package, rule)
            except Exception as exc:
                raise self.lost(f"it did not answer ({_cause(exc)})") from None
            if isinstance(answer, dict) and "result" in answer:
                return answer["result"]
            # What a restarted OPA answers: it no longer holds the library. Fill it again
            # and ask once more.
            with self._lock:
                self._held = ""
                self._check_or_push()
            self._announce()
        raise self.unavailable()

    def lost(self, fault: str) -> PolicyEngineUnavailable:
        """Record that OPA failed (it is checked and filled again by the next probe)."""
        with self._lock:
            self._fail(fault)
        self._announce()
        return self.unavailable()

    def unavailable(self) -> PolicyEngineUnavailable:
        """The refusal while OPA is unavailable, naming its address for the owner's record."""
        return PolicyEngineUnavailable(
            f"the OPA server at {self.address} cannot decide: {self._fault}; requests are "
            "refused until it answers again from this connector's policies, which the "
            "connector pushes again by itself"
        )

    def _fail(self, fault: str) -> None:
        if self._held or self._fault != fault:
            log.error("the OPA server at %s is unavailable: %s", self.address, fault)
        self._held, self._fault = "", fault

    def _check_or_push(self) -> None:
        """Lock held: make OPA hold and answer from the wanted push, or record why not."""
        assert self._wanted is not None
        self._checked = time.monotonic()
        try:
            answer = self._client.query_rule(_PROBE_INPUT, self.package, "decision")
        except Exception as exc:
            self._fail(f"it did not answer ({_cause(exc)})")
            return
        result = answer.get("result") if isinstance(answer, dict) else None
        if isinstance(result, dict) and result.get("revision") == self._wanted.revision:
            self._answers_from(result)
            return
        if isinstance(result, dict) or result is None:
            self._push_wanted()  # empty (restarted) or holding other policies: fill it again
            return
        self._fail("it answered something that is not a decision")

    def _push_wanted(self) -> None:
        """Lock held: push the library and data, then check what OPA answers from."""
        assert self._wanted is not None
        self._checked = time.monotonic()
        try:
            self._client.update_policy_from_string(self._library, self.package)
            self._client.update_or_create_data(self._wanted.data, self._data_path)
            answer = self._client.query_rule(_PROBE_INPUT, self.package, "decision")
        except Exception as exc:
            self._fail(f"the policies could not be pushed ({_cause(exc)})")
            return
        result = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(result, dict) or result.get("revision") != self._wanted.revision:
            got = result.get("revision") if isinstance(result, dict) else None
            self._fail(
                f"after the push it answers from revision {got!r}, not {self._wanted.revision!r}"
            )
            return
        log.info("policies revision %s pushed to OPA under %s", self._wanted.revision, self.package)
        self._answers_from(result)

    def _answers_from(self, result: dict[str, Any]) -> None:
        assert self._wanted is not None
        try:
            decision_from(result, (), self._wanted.revision)
        except PolicyEngineError as exc:
            self._fail(f"it answered a malformed decision ({exc})")
            return
        if not self._held:
            log.info(
                "the OPA server at %s answers from revision %s", self.address, self._wanted.revision
            )
        self._held, self._fault = self._wanted.revision, ""

    def _announce(self) -> None:
        listener, available = self.on_change, self.available
        if listener is None:
            return
        try:
            listener(available)
        except Exception:
            log.exception("the OPA availability listener failed")


def _cause(error: Exception) -> str:
    """A short, stable name for why a call to OPA failed (the full text goes to debug)."""
    log.debug("OPA call failed", exc_info=error)
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return f"{type(error).__name__} {status}" if status else type(error).__name__


class OpaServerEngine:
    """Evaluates the Rego library in an OPA server under this connector's own names."""

    def __init__(self, policies: Sequence[UsagePolicy], link: OpaLink) -> None:
        self._link = link
        data = policy_data(policies)[DATA_KEY]
        self.revision = str(data["revision"])
        link.push(self.revision, data)

    def _answer(self, rule: str, document: dict[str, Any], read: Callable[[Any], T]) -> T:
        result = self._link.query(rule, document, self.revision)
        try:
            return read(result)
        except UntrustedAnswer as exc:
            # Not this push's answer: OPA lost or was given other policies. Refused, and
            # pushed again by the next probe; logged with both revisions.
            raise self._link.lost(exc.message) from None
        except PolicyEngineError as exc:
            raise self._link.lost(f"it answered nonsense ({exc.message})") from None

    def decide(self, request: DecisionRequest) -> Decision:
        """The decision for one request."""
        return self._answer(
            "decision",
            request.as_input(),
            lambda result: decision_from(result, request.datasets, self.revision),
        )

    def catalog(self, member: str, time: dt.datetime) -> tuple[CatalogGrant, ...]:
        """What is granted to member at time, any purpose."""
        return self._answer(
            "catalog",
            {"member": member, "time_ns": ns(time)},
            lambda result: catalog_from(result, self.revision),
        )


def build_engine(
    kind: str, policies: Sequence[UsagePolicy], *, opa: OpaLink | None = None
) -> PolicyEngine:
    """The engine named in connector.toml over these policies, its answers checked."""
    if kind == "embedded":
        return CheckedEngine(EmbeddedEngine(policies), policies)
    if kind == "opa" and opa is not None:
        return CheckedEngine(OpaServerEngine(policies, opa), policies)
    raise PolicyEngineError(f"unknown policy engine {kind!r}; use 'embedded' or 'opa'")


def opa_link(settings: Settings, namespace_of: str = "") -> OpaLink | None:
    """The connection to the OPA server when the home's engine is `opa`, else None.

    namespace_of: what else shares this connector's OPA (e.g. policy tests); their names
    there are their own, so that the policies in force are never replaced."""
    if settings.policies.engine != "opa":
        return None
    owner = settings.member_id + (f"\n{namespace_of}" if namespace_of else "")
    return OpaLink(
        OpaConnection(
            settings.policies.opa_url,
            opa_namespace(settings.dataspace, owner),
            token=_opa_token(settings.policies.opa_token_file),
            ca_file=str(settings.policies.opa_ca or ""),
        )
    )


def engine_factory(
    settings: Settings, opa: OpaLink | None
) -> Callable[[Sequence[UsagePolicy]], PolicyEngine]:
    """Builds the home's engine over given policies (on every reload)."""

    def factory(policies: Sequence[UsagePolicy]) -> PolicyEngine:
        return build_engine(settings.policies.engine, policies, opa=opa)

    return factory


def _opa_token(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the OPA token file {path}: {exc}") from None
    if not token or any(c.isspace() for c in token):
        raise ConfigError(f"the OPA token file {path} must hold one token on one line")
    return token
