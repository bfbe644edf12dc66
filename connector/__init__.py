"""Federated data-sharing connector: answer peers' queries only where a signed policy allows.

Layers, lowest first (README, Layout): basics (errors, names, canonical JSON, escaping, SQL
text), settings and keys (config, identity, jws, receipt), data (store), SQL (pre-scan,
syntax tree, guard, shaping, noise and the aggregate-only form), policy/ (format, signing,
versions, engines, registry), enforcement (enforce, plan check, quotas, slots, sandbox),
answering (audit, query run, provider), transport (wire, service, server, client), cli/.

This module also sets up the native allocators (before duckdb and pyarrow read their settings).
"""

import ctypes
import os
from pathlib import Path


def _share_one_cpp_allocator() -> bool:
    """Bind every C++ library's operator new/delete to libstdc++'s; False when regopy's library
    was loaded before this package, so its bindings were made already.

    regopy's library exports operator new/delete of its own (snmalloc). Loaded privately after
    duckdb, pyarrow or grpc, it bound them to itself while the libstdc++ code it calls bound
    them to libstdc++: memory freed to the other allocator was never reused, about 20 KB per
    Rego decision (issue 17). Loaded globally first, as before, snmalloc served every C++
    library in the process and kept whatever it had served: a server stayed 35 MiB (17%)
    above its start after 64 concurrent Flight peers, for good. With libstdc++ in the global
    scope, every library, regopy's included, binds new/delete to it, in any import order.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    try:
        ctypes.CDLL("libstdc++.so.6", ctypes.RTLD_GLOBAL)
    except OSError:  # no GNU C++ runtime: no second allocator to bind to either
        return True
    return "librego_shared" not in maps


ONE_CPP_ALLOCATOR = _share_one_cpp_allocator()

__version__ = "0.1.0"

# Both are read once, when duckdb / pyarrow load, so they are set here, first (see
# process_memory.py). DuckDB's own jemalloc keeps the address space of freed memory by
# default; under the server's address-space limit that left nothing for gRPC after one
# large query.
os.environ.setdefault("DUCKDB_JE_MALLOC_CONF", "retain:false,dirty_decay_ms:0,muzzy_decay_ms:0")
# Arrow's default pool (mimalloc) reserves 1 GiB of address space at its first allocation,
# also where C++ code ignores pyarrow.set_memory_pool: the system allocator does not.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
