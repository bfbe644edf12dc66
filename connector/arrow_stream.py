"""Arrow IPC stream encoding in pieces, so a result can be sent batch by batch.

The pieces concatenated in order are one valid Arrow IPC stream (schema, record batches,
end-of-stream marker), which every Arrow library reads.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from typing import Any

import pyarrow as pa

from connector.errors import AnswerTooLarge


def narrowed_schema(schema: pa.Schema) -> pa.Schema:
    """schema with whole-number decimals as int64: DuckDB gives sums of integers as HUGEINT,
    which Arrow carries as decimal128(38, 0), and peers' tools read as Decimal objects."""
    return pa.schema(
        [
            field.with_type(pa.int64())
            if pa.types.is_decimal(field.type) and field.type.scale == 0
            else field
            for field in schema
        ],
        metadata=schema.metadata,
    )


def narrowed(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """batch cast to the narrowed schema; ArrowInvalid when a value does not fit."""
    return batch if batch.schema.equals(schema) else batch.cast(schema, safe=True)


def check_piece_size(piece: bytes, max_piece_bytes: int) -> None:
    """AnswerTooLarge when piece is over the transport's message limit (0: none)."""
    if max_piece_bytes and len(piece) > max_piece_bytes:
        raise AnswerTooLarge(
            f"one piece of the answer is {len(piece)} bytes, over the {max_piece_bytes}-byte "
            "message limit; select fewer or narrower columns"
        )


def without_dictionaries(schema: pa.Schema) -> pa.Schema:
    """schema with dictionary columns as plain values: their IPC size is then predictable."""
    fields = [
        f.with_type(f.type.value_type) if pa.types.is_dictionary(f.type) else f for f in schema
    ]
    return pa.schema(fields, metadata=schema.metadata)


class _ChunkSink(io.RawIOBase):
    """A write-only file that keeps what was written until it is taken."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data


# The current IPC format, stated once: without options pyarrow reads two environment
# variables for a legacy format on every stream it opens.
WRITE_OPTIONS = pa.ipc.IpcWriteOptions(metadata_version=pa.ipc.MetadataVersion.V5)


class IpcPieces:
    """Encodes record batches to Arrow IPC bytes and keeps a running digest of all bytes."""

    def __init__(self, schema: pa.Schema) -> None:
        self._sink = _ChunkSink()
        self._writer = pa.ipc.new_stream(self._sink, schema, options=WRITE_OPTIONS)
        self._digest = hashlib.sha256()
        self.bytes_sent = 0
        # The digest at each piece boundary not yet handed over (see handed_over): what a
        # transport sent of an answer cut short is recorded without hashing it twice.
        self._boundaries: dict[int, Any] = {0: self._digest.copy()}

    def _take(self) -> bytes:
        data = self._sink.take()
        self._digest.update(data)
        self.bytes_sent += len(data)
        self._boundaries[self.bytes_sent] = self._digest.copy()
        return data

    def encode(self, batch: pa.RecordBatch) -> bytes:
        """The IPC bytes of one batch (with the schema before the first one)."""
        self._writer.write_batch(batch)
        return self._take()

    def finish(self) -> bytes:
        """The closing bytes (schema if nothing was written, and the end-of-stream marker)."""
        self._writer.close()
        return self._take()

    @property
    def sha256(self) -> str:
        """Hex sha256 of every byte produced so far."""
        return self._digest.hexdigest()

    def handed_over(self, size: int) -> None:
        """The first size bytes reached the transport: forget the boundaries before them."""
        for boundary in [b for b in self._boundaries if b < size]:
            del self._boundaries[boundary]

    def sha256_of_first(self, size: int) -> str:
        """Hex sha256 of the first size bytes produced, at a piece boundary not before the
        last one handed over (what a transport sent of an answer cut short)."""
        digest = self._boundaries.get(size)
        if digest is None:
            raise ValueError(f"no digest of the first {size} of {self.bytes_sent} bytes")
        return str(digest.hexdigest())


def read_ipc_pieces(pieces: Iterable[bytes]) -> pa.Table:
    """Join IPC pieces received in order and read them as one table."""
    return pa.ipc.open_stream(b"".join(pieces)).read_all()
