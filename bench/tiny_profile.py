"""Tiny-query latency of the gRPC Query path, and where the server's time goes.

  python -m bench.tiny_profile [--queries N] [--runs R] [--before DIR]

Builds a small data space (one provider, one grantee) and times N one-row queries through
the raw gRPC stub against `connector serve` in its own process, as `make bench` does.
With --before DIR (a copy of an older tree: `git archive COMMIT | tar -x -C DIR`), the
runs alternate between that tree's server and this one's, in one sitting, so the two are
compared under the same load on the machine. With --profile, the server runs in this
process under cProfile instead and the heaviest functions are printed.
"""

from __future__ import annotations

# First: the package sets up the native allocators before duckdb and pyarrow load (see
# connector/__init__.py).
import connector  # noqa: F401

# isort: split

import argparse
import collections
import cProfile
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.control import connector_process, cpu_seconds, free_port, served
from bench.control import tiny_latencies as latencies
from bench.peer_load import percentile, raw_stub
from bench.stream import DATASET, PURPOSE, build_space
from connector.client import Peer, PeerIdentity

TINY = f"SELECT plant, defects FROM {DATASET} LIMIT 1"
HERE = Path(__file__).resolve().parent.parent


TICKS = os.sysconf("SC_CLK_TCK")
PY_SPY = Path(sys.executable).with_name("py-spy")


def thread_cpu(pid: int) -> collections.Counter[str]:
    """CPU ticks of process pid's threads so far, by thread name."""
    ticks: collections.Counter[str] = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name, fields = (task / "stat").read_text().rsplit(")", 1)
        except OSError:
            continue  # the thread ended
        values = fields.split()
        ticks[name.split("(", 1)[1]] += int(values[11]) + int(values[12])
    return ticks


def timed_run(
    tree: Path,
    provider: Path,
    identity: PeerIdentity,
    count: int,
    log: Path,
    spy: Path | None = None,
) -> list[float]:
    """Milliseconds of count tiny queries against a server whose code comes from tree;
    spy: where py-spy writes the server's sampled stacks (collapsed) meanwhile."""
    port, flight_port = free_port(), free_port()
    env_before, cwd_before = os.environ.get("PYTHONPATH"), Path.cwd()
    # The server process imports connector from tree: `python -c` puts its working folder
    # first on sys.path, then PYTHONPATH.
    os.environ["PYTHONPATH"] = str(tree)
    os.chdir(tree)
    try:
        with (
            served(connector_process(provider, port, flight_port), port, log) as server,
            Peer(f"localhost:{port}", identity, timeout=60) as peer,
        ):
            once = raw_stub(peer, TINY, PURPOSE)
            if spy is None:
                before, threads = cpu_seconds(server.pid), thread_cpu(server.pid)
                times = [t * 1000 for t in latencies(once, count)]
                cpu_ms = (cpu_seconds(server.pid) - before) * 1000 / (count + 5)
                spent = thread_cpu(server.pid) - threads
                busiest = ", ".join(
                    f"{name} {ticks * 1000 / TICKS / (count + 5):.2f}"
                    for name, ticks in spent.most_common(6)
                )
                print(f"  server CPU per query: {cpu_ms:.2f} ms ({busiest})", flush=True)
                return times
            latencies(once, 20)
            argv = [str(PY_SPY), "record", "-p", str(server.pid), "-o", str(spy),
                    "--format", "raw", "-r", "500", "--nonblocking"]  # fmt: skip
            sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
            try:
                return [t * 1000 for t in latencies(once, count)]
            finally:
                sampler.send_signal(signal.SIGINT)
                sampler.wait(60)
    finally:
        os.chdir(cwd_before)
        if env_before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = env_before


def profiled(provider: Path, identity: PeerIdentity, count: int, top: int) -> None:
    """Serve in this process and print the top of cProfile (the calling thread only: the
    client side; use --spy for the server's threads)."""
    from connector.config import load_settings
    from connector.server import start_server

    server = start_server(load_settings(provider), "127.0.0.1:0", "")
    profile = cProfile.Profile()
    try:
        with Peer(f"localhost:{server.port}", identity, timeout=60) as peer:
            once = raw_stub(peer, TINY, PURPOSE)
            latencies(once, 20)
            profile.enable()
            times = [t * 1000 for t in latencies(once, count)]
            profile.disable()
    finally:
        server.stop(grace=1)
    print(f"in-process: p50 {percentile(times, 0.5):.2f} ms, p99 {percentile(times, 0.99):.2f} ms")
    stats = pstats.Stats(profile)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)


def hottest(collapsed: Path, top: int, within: str = "_WorkItem.run") -> list[str]:
    """The functions most often on the server's sampled stacks (inclusive, line numbers
    dropped), as shares of the samples taken inside a request's handler (within)."""
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if within not in stack:
            continue
        total += int(count)
        frames = {re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")[1:]}
        for frame in frames:
            inclusive[frame] += int(count)
    return [f"{n / total:6.1%}  {frame}" for frame, n in inclusive.most_common(top)]


def summary(name: str, runs: list[list[float]]) -> str:
    """p50 and p99 of each run, then their medians and ranges."""
    p50 = [percentile(r, 0.5) for r in runs]
    p99 = [percentile(r, 0.99) for r in runs]
    each = ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(p50, p99, strict=True))
    return (
        f"{name}: p50 median {statistics.median(p50):.2f} ms ({min(p50):.2f}-{max(p50):.2f}), "
        f"p99 median {statistics.median(p99):.2f} ms ({min(p99):.2f}-{max(p99):.2f}); "
        f"runs p50/p99: {each}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--before", type=Path, help="an older tree to alternate with")
    parser.add_argument("--profile", action="store_true", help="cProfile an in-process server")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--spy", type=Path, help="py-spy the server of one run into this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="connector-tiny-"))
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> None:
    """What main() was asked for, in the throwaway folder work."""
    provider, grantee = build_space(work, args.rows)
    identity = PeerIdentity.from_home(grantee)
    if args.profile:
        profiled(provider, identity, args.queries, args.top)
        return
    if args.spy:
        times = timed_run(HERE, provider, identity, args.queries, work / "spy.log", args.spy)
        print(f"p50 {percentile(times, 0.5):.2f} ms, p99 {percentile(times, 0.99):.2f} ms")
        print("\n".join(hottest(args.spy, args.top)))
        return
    trees = {"after": HERE} if args.before is None else {"before": args.before, "after": HERE}
    runs: dict[str, list[list[float]]] = {name: [] for name in trees}
    for index in range(args.runs):
        for name, tree in trees.items():
            log = work / f"{name}-{index}.log"
            runs[name].append(timed_run(tree, provider, identity, args.queries, log))
            print(
                f"run {index + 1} {name}: p50 {percentile(runs[name][-1], 0.5):.2f} ms", flush=True
            )
    for name, measured in runs.items():
        print(summary(name, measured))


if __name__ == "__main__":
    main()
