"""The decision library evaluated by an OPA server (REST API, via opa-python-client), and
the choice between it and the embedded engine (`build_engine`).

Several connectors may share one OPA server: each writes the library under its own package
and its policies under its own data path, both named by a namespace derived from its data
space and member id, and checks after every push that OPA holds its revision. Every answer
echoes that revision; the caller also checks each answer against the signed policies it
names (policy/answers.py), so an OPA that says "allow" beyond them is not obeyed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from connector.errors import PolicyEngineError
from connector.policy.engine import (
    DATA_KEY,
    CatalogGrant,
    CheckedEngine,
    Decision,
    DecisionRequest,
    EmbeddedEngine,
    OpaConnection,
    PolicyEngine,
    catalog_from,
    decision_from,
    ns,
    policy_data,
    rego_library,
)
from connector.policy.model import UsagePolicy

log = logging.getLogger(__name__)

LIBRARY_PACKAGE = "package connector.authz"
LIBRARY_DATA = "data.usage_policies"


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


class OpaServerEngine:
    """Evaluates the Rego library in an OPA server under this connector's own names."""

    def __init__(self, policies: Sequence[UsagePolicy], opa: OpaConnection) -> None:
        from opa_client import OpaClient

        parts = urlsplit(opa.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyEngineError(f"opa_url {opa.url!r} must look like http://127.0.0.1:8181")
        if opa.ca_file and parts.scheme != "https":
            raise PolicyEngineError("opa_ca is set but opa_url is not https://")
        self._namespace = opa.namespace
        self._package = f"connector/{opa.namespace}/authz"
        # opa-python-client hands `ssl` to requests as `verify`: a CA file path checks the
        # server against that CA only; True uses the system's CAs.
        verify: bool | str = opa.ca_file or parts.scheme == "https"
        self._client = OpaClient(
            host=parts.hostname,
            port=parts.port or (443 if parts.scheme == "https" else 8181),
            ssl=verify,
            token=opa.token or None,
            timeout=opa.timeout,
        )
        if opa.ca_file:
            # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE replace a session's CA file;
            # the configured OPA CA must be the one that counts.
            self._client._session.trust_env = False
        data = policy_data(policies)[DATA_KEY]
        self.revision = str(data["revision"])
        try:
            self._client.update_policy_from_string(namespaced_library(opa.namespace), self._package)
            self._client.update_or_create_data(data, f"connector_data/{opa.namespace}/{DATA_KEY}")
            held = self._client.get_data(f"connector_data/{opa.namespace}/{DATA_KEY}/revision")
        except PolicyEngineError:
            raise
        except Exception as exc:
            log.error("cannot load the policies into OPA at %s: %s", opa.url, exc)
            raise PolicyEngineError(
                "the policies could not be loaded into the OPA server"
            ) from None
        if not isinstance(held, dict) or held.get("result") != self.revision:
            log.error("OPA at %s does not hold revision %s after the push", opa.url, self.revision)
            raise PolicyEngineError("the OPA server does not hold the policies just pushed")
        log.info("policies revision %s pushed to OPA under %s", self.revision, self._package)

    def _query(self, rule: str, document: dict[str, Any]) -> Any:
        try:
            answer = self._client.query_rule(document, self._package, rule)
        except Exception as exc:
            log.error("the OPA server did not answer: %s", exc)
            raise PolicyEngineError("the policy engine did not answer") from None
        if not isinstance(answer, dict) or "result" not in answer:
            log.error("the OPA server returned no result for %s/%s", self._package, rule)
            raise PolicyEngineError("the policy engine returned no result")
        return answer["result"]

    def decide(self, request: DecisionRequest) -> Decision:
        """The decision for one request."""
        return decision_from(
            self._query("decision", request.as_input()), request.datasets, self.revision
        )

    def catalog(self, member: str, time: dt.datetime) -> tuple[CatalogGrant, ...]:
        """What is granted to member at time, any purpose."""
        return catalog_from(
            self._query("catalog", {"member": member, "time_ns": ns(time)}), self.revision
        )


def build_engine(
    kind: str, policies: Sequence[UsagePolicy], *, opa: OpaConnection | None = None
) -> PolicyEngine:
    """The engine named in connector.toml over these policies, its answers checked."""
    if kind == "embedded":
        return CheckedEngine(EmbeddedEngine(policies), policies)
    if kind == "opa" and opa is not None:
        return CheckedEngine(OpaServerEngine(policies, opa), policies)
    raise PolicyEngineError(f"unknown policy engine {kind!r}; use 'embedded' or 'opa'")
