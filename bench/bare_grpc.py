"""A bare grpcio server for `make bench`: streams saved Arrow IPC pieces over mutual TLS.

argv: PIECES CERT KEY CA PORT. Every call to /bench.Bare/Stream sends the pieces as they are
(bytes in, bytes out: no protobuf, no policy, no audit), so its CPU per call is what grpcio
itself costs to stream those bytes.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from connector.signal_inbox import SignalInbox


def read_pieces(path: Path) -> list[bytes]:
    """The length-prefixed pieces bench/control.py saved."""
    data = path.read_bytes()
    pieces, at = [], 0
    while at < len(data):
        size = int.from_bytes(data[at : at + 8], "little")
        pieces.append(data[at + 8 : at + 8 + size])
        at += 8 + size
    return pieces


def main() -> None:
    pieces_file, cert, key, ca, port = sys.argv[1:6]
    pieces = read_pieces(Path(pieces_file))

    def stream(_request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from pieces

    handler = grpc.unary_stream_rpc_method_handler(stream)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[("grpc.max_send_message_length", 64 * 1024 * 1024)],
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Bare", {"Stream": handler}),)
    )
    credentials = grpc.ssl_server_credentials(
        [(Path(key).read_bytes(), Path(cert).read_bytes())],
        root_certificates=Path(ca).read_bytes(),
        require_client_auth=True,
    )
    server.add_secure_port(f"127.0.0.1:{port}", credentials)
    with SignalInbox((signal.SIGTERM,)) as inbox:
        server.start()
        inbox.wait(None)
    server.stop(1).wait()


if __name__ == "__main__":
    main()
