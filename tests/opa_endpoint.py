"""A small OPA-compatible HTTP endpoint for tests (no OPA binary can be installed here).

It implements what the connector uses of OPA's REST API: PUT /v1/policies/ID, PUT and GET
/v1/data/PATH (nested documents, as OPA keeps them) and POST /v1/data/PATH evaluating the
pushed Rego modules with regopy. Options: a bearer token it demands, TLS, a fixed port (to
stop an endpoint and start an empty one in its place, as a restarted OPA), and modes that
misbehave: answer every decision with "allow everything" (an OPA that lies), answer
nonsense, or acknowledge pushes without keeping them (answering from what it held before).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from regopy import Interpreter


@dataclass
class OpaState:
    """What the endpoint holds and how it behaves."""

    modules: dict[str, str] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    token: str = ""
    allow_everything: bool = False
    nonsense: bool = False  # every evaluation answers a result that is not a decision
    frozen: bool = False  # pushes are acknowledged but not kept
    requests: int = 0
    pushes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def _path(raw: str, prefix: str) -> list[str]:
    return [part for part in raw.split("?", 1)[0].removeprefix(prefix).split("/") if part]


def _get(document: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(document, dict) or part not in document:
            return None
        document = document[part]
    return document


def _lie(input_document: dict[str, Any], revision: Any) -> dict[str, Any]:
    """A decision granting every column of every dataset asked for, under the policy `q`,
    echoing the connector's own revision (a liar that knows the protocol)."""
    columns = input_document.get("columns") or {}
    return {
        "allow": True,
        "reasons": [],
        "grants": [
            {"dataset": d, "columns": sorted(columns.get(d, [])), "policies": [["q", 1]]}
            for d in input_document.get("datasets", [])
        ],
        "obligations": {"attribution": [], "terms": []},
        "revision": revision,
    }


def _handler(state: OpaState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            return

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def _send(self, status: int, document: object | None = None) -> None:
            body = b"" if document is None else json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _authorised(self) -> bool:
            if state.token and self.headers.get("Authorization") != f"Bearer {state.token}":
                self._send(401, {"code": "unauthorized", "message": "bearer token required"})
                return False
            return True

        def do_PUT(self) -> None:
            if not self._authorised():
                return
            with state.lock:
                state.pushes += 1
                if state.frozen:
                    self._body()
                    self._send(200 if self.path.startswith("/v1/policies/") else 204, {})
                elif self.path.startswith("/v1/policies/"):
                    state.modules[self.path.removeprefix("/v1/policies/")] = self._body().decode()
                    self._send(200, {})
                elif self.path.startswith("/v1/data/"):
                    parts = _path(self.path, "/v1/data/")
                    node = state.data
                    for part in parts[:-1]:
                        node = node.setdefault(part, {})
                    node[parts[-1]] = json.loads(self._body())
                    self._send(204)
                else:
                    self._send(404, {"code": "not_found"})

        def do_GET(self) -> None:
            if not self._authorised():
                return
            with state.lock:
                value = _get(state.data, _path(self.path, "/v1/data/"))
            self._send(200, {"result": value} if value is not None else {})

        def do_POST(self) -> None:
            if not self._authorised():
                return
            document = json.loads(self._body())["input"]
            with state.lock:
                state.requests += 1
                parts = _path(self.path, "/v1/data/")
                if state.nonsense:
                    self._send(200, {"result": ["not", "a", "decision"]})
                    return
                if state.allow_everything and len(parts) > 1:
                    revision = _get(state.data, ["connector_data", parts[1], "usage_policies"])
                    lie = _lie(document, (revision or {}).get("revision"))
                    self._send(200, {"result": lie})
                    return
                interpreter = Interpreter()
                for name, text in state.modules.items():
                    interpreter.add_module(name, text)
                interpreter.add_data(state.data)
            rule = ".".join(_path(self.path, "/v1/data/"))
            interpreter.set_input(document)
            try:
                output = json.loads(str(interpreter.query(f"x = data.{rule}")))
            except ValueError:
                output = {}  # nothing there (regopy says so in words): OPA's undefined
            if not isinstance(output, dict) or "bindings" not in output:
                self._send(200, {})
                return
            self._send(200, {"result": output["bindings"]["x"]})

    return Handler


class _Server(ThreadingHTTPServer):
    """Handler threads are daemons and tracked, so that stop() closes open keep-alive
    connections at once: a stopped endpoint answers nothing, and stops without waiting."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.connections: set[Any] = set()

    def process_request(self, request: Any, client_address: Any) -> None:
        self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.connections.discard(request)
        super().shutdown_request(request)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        for connection in list(self.connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                connection.close()


@contextmanager
def opa_endpoint(
    state: OpaState | None = None, tls: tuple[str, str] | None = None, port: int = 0
) -> Iterator[tuple[str, OpaState]]:
    """Run the endpoint on 127.0.0.1 (HTTPS with tls=(cert file, key file)); yields its URL."""
    state = state or OpaState()
    server = _Server(("127.0.0.1", port), _handler(state))
    scheme = "http"
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    # A short poll interval: shutdown() waits for the loop to notice.
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.stop()
        thread.join(timeout=5)
