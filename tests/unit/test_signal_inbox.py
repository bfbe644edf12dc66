"""SignalInbox: signals arrive as messages for the main thread, also in a flood, and a stop
signal is never lost to a handler that deadlocked on a lock the main thread held."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

CHILD = """
import signal, sys, threading
from connector.signal_inbox import SignalInbox

busy = threading.Event()  # the main thread keeps taking an Event's lock, as a server's loop does
usr1 = 0
with SignalInbox((signal.SIGUSR1, signal.SIGTERM)) as inbox:
    print("ready", flush=True)
    # Not read while the flood lasts: the wake-up socket fills and drops bytes.
    busy.wait(float(sys.argv[1]))
    while True:
        busy.wait(0.00001)
        received = inbox.wait(None)
        usr1 += sum(1 for n in received if n == signal.SIGUSR1)
        if signal.SIGTERM in received:
            break
print("stopped", usr1 > 0, signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
"""


def test_a_flood_of_signals_then_sigterm_ends_the_loop_and_restores_the_handlers() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, "1.5"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        flood_until = time.monotonic() + 1.0
        while time.monotonic() < flood_until:
            os.kill(child.pid, signal.SIGUSR1)
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=20)
    finally:
        child.kill()
    assert child.returncode == 0
    assert out.strip() == "stopped True True"
