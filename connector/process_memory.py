"""The server process's own memory bound, the sandbox's defence when DuckDB's does not hold.

DuckDB's `memory_limit` does not count strings and lists built while expressions run, nor
aggregate states: one query can take gigabytes and the kernel then kills the whole server.
`connector serve` therefore limits its own address space (RLIMIT_AS) once it serves: an
allocation past the limit fails, DuckDB ends that query with its out-of-memory error
(RESOURCE_EXHAUSTED for the peer), frees what it held, and the server goes on.

The limit is what the process has mapped when it starts serving plus an allowance, not an
absolute size: the libraries and the worker threads' stacks map more than a GiB at start
that is never touched, so only growth after start can be bounded. Allocators are set to keep
that growth close to the memory really used: glibc keeps at most MALLOC_ARENAS arenas (each
reserves 64 MiB of address space per thread that allocates) and unmaps large blocks when
they are freed, pyarrow uses the system allocator (mimalloc, its default, reserves 1 GiB
at its first allocation and keeps it), and DuckDB's own jemalloc returns the address space
of what it frees (set in connector/__init__.py, before duckdb is imported; by default it
keeps it, and after one query at the limit gRPC found no memory left and stopped answering).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUTO = "auto"
# Measured (README "Memory"): threads' stacks, two malloc arenas, gRPC buffers, Python and
# Arrow batches of a busy server take about 300 MiB beyond DuckDB's own memory.
DEFAULT_OVERHEAD = 512 << 20
MIN_OVERHEAD = 256 << 20
MALLOC_ARENAS = 1
MMAP_THRESHOLD = 256 << 10
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers
_M_ARENA_MAX = -8
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40})


def parse_size(text: str) -> int | None:
    """Bytes in a size as DuckDB writes them ('1GB' = 10^9, '512MiB' = 2^29); None if not one."""
    found = _SIZE.fullmatch(text)
    if not found:
        return None
    return int(float(found.group(1)) * _UNITS[found.group(2).upper()])


def process_allowance(memory_limit: str, process_memory_limit: str) -> int:
    """Bytes the server may map beyond what it maps at start ('auto': DuckDB's limit plus
    DEFAULT_OVERHEAD)."""
    if process_memory_limit.strip().lower() == AUTO:
        return (parse_size(memory_limit) or 0) + DEFAULT_OVERHEAD
    return parse_size(process_memory_limit) or 0


def prepare_allocators() -> None:
    """Keep address space close to memory in use; call before the server starts threads."""
    import pyarrow as pa  # here, so that reading connector.toml does not load Arrow

    pa.set_memory_pool(pa.system_memory_pool())
    libc_name = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc_name:
        libc = ctypes.CDLL(libc_name)
        # A fixed mmap threshold: large blocks are unmapped when freed, instead of staying
        # in an arena (glibc's default raises the threshold after each large free).
        settings = ((_M_ARENA_MAX, MALLOC_ARENAS), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        if not all(libc.mallopt(option, value) for option, value in settings):
            log.warning("could not tune the C allocator; address space may run short sooner")


@dataclass(frozen=True)
class AddressSpaceLimit:
    """The limit set, and what it was made of."""

    mapped_at_start: int
    allowance: int

    @property
    def limit(self) -> int:
        return self.mapped_at_start + self.allowance


def limit_address_space(allowance: int) -> AddressSpaceLimit | None:
    """Limit this process's address space to what it maps now plus allowance (Linux);
    None where the platform cannot (then only DuckDB's own limit applies)."""
    try:
        import resource
    except ImportError:
        return None
    mapped = mapped_bytes()
    if mapped is None or not hasattr(resource, "RLIMIT_AS"):
        return None
    wanted = mapped + allowance
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_AS, (wanted, wanted))
    return AddressSpaceLimit(mapped, wanted - mapped)


def mapped_bytes(status: Path = Path("/proc/self/status")) -> int | None:
    """The process's virtual size (VmSize) in bytes, or None where /proc is not there."""
    try:
        text = status.read_text(encoding="ascii")
    except OSError:
        return None
    found = re.search(r"^VmSize:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else None
