"""Federated data-sharing connector: answer peers' queries only where a signed policy allows."""

import os

__version__ = "0.1.0"

# DuckDB's own jemalloc keeps the address space of freed memory by default; under the
# server's address-space limit (process_memory.py) that would leave nothing for gRPC after
# one large query. It reads this once, when duckdb is imported: so it is set here, first.
os.environ.setdefault("DUCKDB_JE_MALLOC_CONF", "retain:false,dirty_decay_ms:0,muzzy_decay_ms:0")
