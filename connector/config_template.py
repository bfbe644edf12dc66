"""The connector.toml that `connector init` writes: every setting with its default, explained."""

from __future__ import annotations

from connector.config import (
    CONFIG_FORMAT,
    DEFAULT_FLIGHT_LISTEN,
    DEFAULT_PATHS,
    DEFAULT_REFUSAL_BURST,
    DEFAULT_REFUSALS_PER_MINUTE,
    DEFAULT_SHAPED_COPIES_MAX_BYTES,
    MetricsSettings,
    PolicySettings,
    ServerSettings,
)

# Every value below comes from the loader's own defaults, so that the file `init` writes and
# a file that leaves a key out mean the same (a test holds them equal).
_S = ServerSettings
_P = PolicySettings


def _path(section: str, key: str) -> str:
    return f'"{DEFAULT_PATHS[section, key]}"'


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def render_config(
    member_id: str, dataspace: str, listen: str, flight_listen: str = DEFAULT_FLIGHT_LISTEN
) -> str:
    """The connector.toml that `connector init` writes, with every setting explained."""
    return f"""\
# connector.toml: settings of one member's connector. Paths are relative to this folder.
format = {CONFIG_FORMAT}

[member]
id = "{member_id}"
dataspace = "{dataspace}"

[server]
listen = "{listen}"
max_query_seconds = {_number(_S.max_query_seconds)}      # a query running longer is interrupted (DEADLINE_EXCEEDED)
memory_limit = "{_S.memory_limit}"        # DuckDB memory for all queries together
process_memory_limit = "{_S.process_memory_limit}"  # memory `connector serve` may add to what it maps at start;
                            # "auto" is memory_limit + 512MiB. DuckDB does not count strings
                            # a query builds: past this limit that query ends with
                            # RESOURCE_EXHAUSTED and the server goes on (Linux)
threads = {_S.threads}                 # DuckDB threads
batch_rows = {_S.batch_rows}          # rows per Arrow record batch sent to the peer
max_concurrent_queries = {_S.max_concurrent_queries}  # more at once wait in the queue below
queue_length = {_S.queue_length}           # queries that may wait for a slot; more are refused (RESOURCE_EXHAUSTED)
queue_seconds = {_number(_S.queue_seconds)}         # a waiting query is refused after this long (RESOURCE_EXHAUSTED)
explains_per_minute = {_S.explains_per_minute}    # per member; Explain costs no quota, so it is rate-limited
# max_concurrent_queries_per_member = 4  # one member's share; default: half the above
stall_seconds = {_number(_S.stall_seconds)}          # an answer the peer stops reading is ended after this long
shutdown_grace_seconds = {_number(_S.shutdown_grace_seconds)} # at SIGTERM/SIGINT running queries may finish this long,
                            # then they are stopped (the peer is told to retry later)

[tls]
cert = {_path("tls", "cert")}
key = {_path("tls", "key")}
ca = {_path("tls", "ca")}           # the data space's CA bundle: peers must chain to it

[store]
path = {_path("store", "path")}
quota_ledger = {_path("store", "quota_ledger")}   # daily query and row counts per member and policy
shaped_copies = {_path("store", "shaped_copies")} # masked / filtered copies of datasets, remade at start
shaped_copies_max_bytes = "{DEFAULT_SHAPED_COPIES_MAX_BYTES}"      # beyond this, unused copies are dropped

[policies]
dir = {_path("policies", "dir")}
engine = "{_P.engine}"         # or "opa" with opa_url = "http://127.0.0.1:8181"
# opa_token_file = "keys/opa.token"  # bearer token sent to the OPA server (file, 0600)
# opa_ca = "tls/opa-ca.pem"          # CA of the OPA server's certificate (https:// opa_url)
reload_seconds = {_number(_P.reload_seconds)}
versions_file = {_path("policies", "versions_file")}  # highest version in force per
                            # policy: an older signed version put back is refused
mask_consistency = "{_P.mask_consistency}"   # a column masked for a member by one policy and clear by
                            # another: "warn" in the log, or "refuse" that member's queries

[policies.trusted_signers]  # name = Ed25519 public key (PEM) whose policy signatures count
legal = "{DEFAULT_PATHS["signing", "policy_key"]}.pub"

[signing]
policy_key = {_path("signing", "policy_key")}   # legal team's key (keep it elsewhere in production)
receipt_key = {_path("signing", "receipt_key")}         # signs the receipts sent to peers
mask_key = {_path("signing", "mask_key")}               # secret of hash masks (back it up: a new one
                                         # changes every hashed value peers hold)

[audit]                     # one hash-chained entry per request; `connector audit verify`
path = {_path("audit", "path")}
refusal_burst = {DEFAULT_REFUSAL_BURST}          # a member's refusals recorded one by one; beyond, they are
refusals_per_minute = {DEFAULT_REFUSALS_PER_MINUTE}    # refused at once and counted, the allowance refilled this fast

[metrics]                   # Prometheus text at http://LISTEN/metrics; off unless listen is set
# listen = "{MetricsSettings.example_listen}"  # keep it on loopback or a management network: no TLS

[revoked]                   # refused at once, also after a reload (SIGHUP or file change)
members = []
serials = []                # certificate serials in hex. The Flight SQL port cannot see a
                            # certificate's serial: while any is listed here, it refuses
                            # every peer (revoke by member id to keep it open to the others)

[flight]                    # Arrow Flight SQL for ADBC, JDBC, DBeaver (grpc+tls://HOST:PORT),
listen = "{flight_listen}"   # same mutual TLS, policies and audit; the purpose travels in
                            # the call header x-connector-purpose. "" turns the port off
"""
