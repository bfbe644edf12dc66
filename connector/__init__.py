"""Federated data-sharing connector: answer peers' queries only where a signed policy allows."""

import ctypes
import importlib.util
from pathlib import Path

# regopy's library replaces C++ operator new/delete with its own allocator (snmalloc). Loaded
# privately (as Python loads it), it shares libstdc++ with duckdb, pyarrow and grpc while
# binding new/delete differently, and memory freed by the other allocator is never given
# back: about 20 KB per Rego decision, or far more when regopy comes first (issue 17). Loaded
# globally before any of them, every library binds new/delete to the same allocator.
_spec = importlib.util.find_spec("regopy")
if _spec is not None and _spec.origin is not None:
    _library = Path(_spec.origin).parent / "librego_shared.so"
    if _library.exists():
        ctypes.CDLL(str(_library), mode=ctypes.RTLD_GLOBAL)

__version__ = "0.1.0"
