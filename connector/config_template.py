"""The connector.toml that `connector init` writes: every setting with its default, explained."""

from __future__ import annotations

from connector.config import CONFIG_FORMAT


def render_config(member_id: str, dataspace: str, listen: str) -> str:
    """The connector.toml that `connector init` writes, with every setting explained."""
    return f"""\
# connector.toml: settings of one member's connector. Paths are relative to this folder.
format = {CONFIG_FORMAT}

[member]
id = "{member_id}"
dataspace = "{dataspace}"

[server]
listen = "{listen}"
max_query_seconds = 30      # a query running longer is interrupted (DEADLINE_EXCEEDED)
memory_limit = "1GB"        # DuckDB memory for all queries together
process_memory_limit = "auto"  # memory `connector serve` may add to what it maps at start;
                            # "auto" is memory_limit + 512MiB. DuckDB does not count strings
                            # a query builds: past this limit that query ends with
                            # RESOURCE_EXHAUSTED and the server goes on (Linux)
threads = 2                 # DuckDB threads
batch_rows = 65536          # rows per Arrow record batch sent to the peer
max_concurrent_queries = 8  # more at once are refused with RESOURCE_EXHAUSTED
explains_per_minute = 60    # per member; Explain costs no quota, so it is rate-limited
# max_concurrent_queries_per_member = 4  # one member's share; default: half the above
stall_seconds = 30          # an answer the peer stops reading is ended after this long

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
ca = "tls/ca.pem"           # the data space's CA bundle: peers must chain to it

[store]
path = "data.duckdb"
quota_ledger = "state/quota.sqlite"   # daily query and row counts per member and policy
shaped_copies = "state/shaped.duckdb" # masked / filtered copies of datasets, remade at start
shaped_copies_max_bytes = "1GiB"      # beyond this, unused copies are dropped

[policies]
dir = "policies"
engine = "embedded"         # or "opa" with opa_url = "http://127.0.0.1:8181"
# opa_token_file = "keys/opa.token"  # bearer token sent to the OPA server (file, 0600)
# opa_ca = "tls/opa-ca.pem"          # CA of the OPA server's certificate (https:// opa_url)
reload_seconds = 2
mask_consistency = "warn"   # a column masked for a member by one policy and clear by
                            # another: "warn" in the log, or "refuse" that member's queries

[policies.trusted_signers]  # name = Ed25519 public key (PEM) whose policy signatures count
legal = "keys/policy-signing.key.pub"

[signing]
policy_key = "keys/policy-signing.key"   # legal team's key (keep it elsewhere in production)
receipt_key = "keys/receipt.key"         # signs the receipts sent to peers
mask_key = "keys/mask.key"               # secret of hash masks (back it up: a new one
                                         # changes every hashed value peers hold)

[audit]                     # one hash-chained entry per request; `connector audit verify`
path = "audit/audit.jsonl"
refusal_burst = 20          # a member's refusals recorded one by one; beyond, they are
refusals_per_minute = 30    # refused at once and counted, the allowance refilled this fast

[revoked]                   # refused at once, also after a reload (SIGHUP or file change)
members = []
serials = []                # certificate serials in hex
"""
