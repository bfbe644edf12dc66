"""Federated data-sharing connector: answer peers' queries only where a signed policy allows.

Layers, lowest first (README, Layout): basics (errors, names, canonical JSON, escaping, SQL
text), settings and keys (config, identity, jws, receipt), data (store), SQL (pre-scan,
syntax tree, guard, shaping, noise and the aggregate-only form), policy/ (format, signing,
versions, engines, registry), enforcement (enforce, plan check, quotas, slots, sandbox),
answering (audit, query run, provider), transport (wire, service, server, client), cli/.

This module also prepares the native allocators before duckdb, pyarrow or grpc load.
"""

import ctypes
import importlib.util
import os
from pathlib import Path


def _load_rego_allocator() -> bool:
    """Load regopy's library globally; False when a C++ library came first (see below).

    The library replaces C++ operator new/delete with its own allocator (snmalloc). Loaded
    privately (as Python loads it), it shares libstdc++ with duckdb, pyarrow and grpc while
    binding new/delete differently, and memory freed to the wrong allocator is never given
    back: about 20 KB per Rego decision (issue 17). Loaded globally before any of them, every
    library binds new/delete to the same allocator.
    """
    spec = importlib.util.find_spec("regopy")
    if spec is None or spec.origin is None:
        return True
    library = Path(spec.origin).parent / "librego_shared.so"
    if not library.exists():
        return True
    try:
        first = "libstdc++" not in Path("/proc/self/maps").read_text()
    except OSError:
        first = True
    ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    return first


REGO_ALLOCATOR_FIRST = _load_rego_allocator()

__version__ = "0.1.0"

# Both are read once, when duckdb / pyarrow load, so they are set here, first (see
# process_memory.py). DuckDB's own jemalloc keeps the address space of freed memory by
# default; under the server's address-space limit that left nothing for gRPC after one
# large query.
os.environ.setdefault("DUCKDB_JE_MALLOC_CONF", "retain:false,dirty_decay_ms:0,muzzy_decay_ms:0")
# Arrow's default pool (mimalloc) reserves 1 GiB of address space at its first allocation,
# also where C++ code ignores pyarrow.set_memory_pool: the system allocator does not.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
