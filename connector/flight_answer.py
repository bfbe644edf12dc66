"""A QueryRun's answer as Arrow Flight sends it: its IPC pieces read back as record batches,
and the receipt that the last message's app_metadata carries."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from connector.canonical import canonical_json
from connector.receipt import ReceiptSigner


class IpcFeed(io.RawIOBase):
    """A read-only file over a QueryRun's Arrow IPC pieces; keeps the run's own error."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        super().__init__()
        self._pieces = pieces
        self._left = memoryview(b"")
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._left:
            try:
                self._left = memoryview(next(self._pieces))
            except StopIteration:
                return 0
            except Exception as error:
                # Kept whole (pyarrow would turn it into an ArrowException); reading ends.
                self.error = error
                return 0
        size = min(len(buffer), len(self._left))
        buffer[:size] = self._left[:size]
        self._left = self._left[size:]
        return size


def receipt_metadata(signer: ReceiptSigner, token: str) -> bytes:
    """The app_metadata of an answer's last message: the receipt with what proves who signed
    it, the fields of a receipt file (`connector receipt verify` reads it as one)."""
    endorsed = signer.endorsement
    bundle = {
        "receipt_jws": token,
        "endorsement": endorsed.jws,
        "provider_certificate_pem": endorsed.certificate_pem,
        "data_format": "arrow",
    }
    return canonical_json(bundle).encode("utf-8")
