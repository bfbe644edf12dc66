"""A thread pool whose threads all start at once, while memory is plentiful.

Under the server's address-space limit (process_memory.py) a thread may fail to start once
peers' queries hold the memory. `ThreadPoolExecutor` starts its threads on demand, inside
`submit`; gRPC calls `submit` from its single serving thread, which ends on the first
exception, after which the server accepts connections and answers nothing, ever. Starting
every worker before the limit is set leaves nothing to start later.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor


class PrestartedThreadPool(ThreadPoolExecutor):
    """A `ThreadPoolExecutor` that starts all `max_workers` threads when created."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self.workers = max_workers
        # Each task holds its thread until all have started, so that every `submit` finds
        # no idle thread and starts a new one, up to max_workers.
        everyone = threading.Barrier(max_workers + 1)
        for _ in range(max_workers):
            self.submit(everyone.wait)
        everyone.wait()

    def started(self) -> int:
        """How many worker threads the pool has started."""
        return len(self._threads)
