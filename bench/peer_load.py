"""Concurrent peers for a bounded time on either wire (`make bench`'s loads): answers, errors
by type, latencies."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import pyarrow.flight as flight

from bench.flight_clients import flight_client_session
from connector.client import Peer, PeerIdentity
from connector.errors import ConnectorError


def raw_stub(peer: Peer, sql: str, purpose: str) -> Callable[[], int]:
    """One query through the generated stub, nothing decoded: the bytes received."""

    def once() -> int:
        return sum(len(m.arrow_ipc) for m in peer.stream(sql, purpose))

    return once


def percentile(values: list[float], share: float) -> float:
    """The share-th quantile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@dataclass
class LoadResult:
    """What N concurrent peers got in a bounded time."""

    peers: int
    seconds: float
    answered: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    first_error: dict[str, str] = field(default_factory=dict)  # by type: its first message

    @property
    def per_second(self) -> float:
        return self.answered / self.seconds


# One peer's connection, for the length of a load: yields that peer's one-query callable.
PeerSession = Callable[[], AbstractContextManager[Callable[[], object]]]


def grpc_peer(address: str, identity: PeerIdentity, sql: str, purpose: str) -> PeerSession:
    """A peer on its own gRPC channel, each query through the raw stub."""

    @contextmanager
    def session() -> Iterator[Callable[[], object]]:
        with Peer(address, identity, timeout=30) as peer:
            yield raw_stub(peer, sql, purpose)

    return session


def flight_peer(port: int, identity: PeerIdentity, sql: str, purpose: str) -> PeerSession:
    """A peer with its own FlightClient, each query GetFlightInfo and DoGet."""
    return lambda: flight_client_session(port, identity, sql, purpose)


def concurrent_load(session: PeerSession, peers: int, seconds: float) -> LoadResult:
    """peers threads, each with its own session (connection), sending tiny queries for
    seconds; errors are counted by type (a gRPC status's or a Flight error's)."""
    result = LoadResult(peers, seconds)
    lock = threading.Lock()
    start = threading.Barrier(peers + 1)
    stop = threading.Event()

    def peer_loop() -> None:
        with session() as once:
            start.wait()
            while not stop.is_set():
                began = time.perf_counter()
                try:
                    once()
                except (ConnectorError, flight.FlightError) as error:
                    with lock:
                        name = type(error).__name__
                        result.errors[name] += 1
                        result.first_error.setdefault(name, str(error).splitlines()[0][:200])
                    continue
                with lock:
                    result.answered += 1
                    result.latencies.append(time.perf_counter() - began)

    threads = [threading.Thread(target=peer_loop, daemon=True) for _ in range(peers)]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join(60)
    return result


def load_lines(path: str, loads: list[LoadResult]) -> list[str]:
    """The report's lines for the loads of one path (gRPC or Flight), against one peer's."""
    lines = []
    one = loads[0].per_second if loads and loads[0].peers == 1 else 0.0
    for load in loads:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(load.errors.items())) or "none"
        p99 = percentile(load.latencies, 0.99) * 1000 if load.latencies else float("nan")
        versus = f", {load.per_second / one:.2f}x one peer" if one else ""
        lines.append(
            f"{path:<6} {load.peers:>3} peers for {load.seconds:g} s: {load.answered} answered "
            f"({load.per_second:.0f}/s{versus}), p99 {p99:.1f} ms, errors: {errors}"
        )
        lines.extend(f"         first {k}: {m}" for k, m in sorted(load.first_error.items()))
    return lines
