"""A member's answer read as it arrives: the Arrow IPC pieces of a Query stream decoded
batch by batch (the received bytes kept once, never copied into a second buffer), hashed
for the receipt and copied to a file when asked; the receipt at the end kept aside."""

from __future__ import annotations

import hashlib
import io
from typing import IO, Any

import pyarrow as pa

from connector.client import Peer
from connector.errors import PeerError


class _ResponseReader(io.RawIOBase):
    """The Arrow IPC pieces of a Query stream as one readable file, hashed (and copied to
    sink) as they pass; the receipt at the end is kept aside."""

    def __init__(self, messages: Any, sink: IO[bytes] | None) -> None:
        super().__init__()
        self._messages = iter(messages)
        self._piece = memoryview(b"")
        self._sink = sink
        self.digest = hashlib.sha256()
        self.token = ""
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def _next_piece(self) -> bool:
        """Take the next Arrow piece off the stream (False at its end)."""
        while not self._piece:
            try:
                message = next(self._messages)
            except StopIteration:
                return False
            except Exception as exc:  # raised again by the caller, not inside Arrow
                self.error = exc
                return False
            if message.HasField("receipt"):
                self.token = message.receipt.jws
                continue
            data = message.arrow_ipc
            self.digest.update(data)
            if self._sink is not None:
                self._sink.write(data)
            self._piece = memoryview(data)
        return True

    def read(self, size: int | None = -1) -> Any:
        """Up to size bytes; a view into the received piece when it holds them all, so the
        Arrow reader keeps the received bytes themselves rather than a copy of them."""
        wanted = size if size is not None and size >= 0 else 1 << 62
        parts: list[memoryview] = []
        while wanted > 0 and self._next_piece():
            part = self._piece[:wanted]
            self._piece = self._piece[len(part) :]
            parts.append(part)
            wanted -= len(part)
        if len(parts) == 1:
            return parts[0]
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def read_answer(
    peer: Peer, sql: str, purpose: str, sink: IO[bytes] | None, max_rows: int = 0
) -> tuple[pa.Table, str, str]:
    """The answer table, its receipt and the sha256 of its bytes, read batch by batch."""
    reader = _ResponseReader(peer.stream(sql, purpose, max_rows=max_rows), sink)
    try:
        table = pa.ipc.open_stream(reader).read_all()
    except (pa.ArrowException, OSError, ValueError):
        if reader.error is not None:
            raise reader.error from None
        raise PeerError(f"{peer.address} sent a result that is not Arrow IPC") from None
    if reader.error is not None:
        raise reader.error
    for _ in iter(lambda: reader.read(1 << 16), b""):  # the rest: the receipt message
        pass
    if reader.error is not None:
        raise reader.error
    if not reader.token:
        raise PeerError(f"{peer.address} ended the result without a receipt; do not trust it")
    return table, reader.token, reader.digest.hexdigest()
