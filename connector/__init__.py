"""Federated data-sharing connector: answer peers' queries only where a signed policy allows."""

import os

__version__ = "0.1.0"

# Both are read once, when duckdb / pyarrow load, so they are set here, first (see
# process_memory.py). DuckDB's own jemalloc keeps the address space of freed memory by
# default; under the server's address-space limit that left nothing for gRPC after one
# large query.
os.environ.setdefault("DUCKDB_JE_MALLOC_CONF", "retain:false,dirty_decay_ms:0,muzzy_decay_ms:0")
# Arrow's default pool (mimalloc) reserves 1 GiB of address space at its first allocation,
# also where C++ code ignores pyarrow.set_memory_pool: the system allocator does not.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
