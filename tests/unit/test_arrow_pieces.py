"""Arrow pieces on the wire: written without protobuf's copies, digested once."""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pytest

from connector._proto.connector.v1 import connector_pb2 as pb
from connector.arrow_stream import IpcPieces, read_ipc_pieces
from connector.wire import arrow_piece_message, query_response_bytes


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 5_000_001])
def test_a_piece_is_encoded_exactly_as_protobuf_encodes_the_message(size: int) -> None:
    piece = bytes(range(256)) * (size // 256) + bytes(size % 256)
    encoded = arrow_piece_message(piece)
    assert encoded == pb.QueryResponse(arrow_ipc=piece).SerializeToString()
    decoded = pb.QueryResponse.FromString(encoded)
    assert decoded.WhichOneof("payload") == "arrow_ipc" and decoded.arrow_ipc == piece


def test_the_stream_serializer_passes_pieces_and_serialises_messages() -> None:
    receipt = pb.QueryResponse(receipt=pb.Receipt(request_id="r"))
    assert query_response_bytes(receipt) == receipt.SerializeToString()
    assert query_response_bytes(b"\x0a\x01x") == b"\x0a\x01x"


def _batch(rows: int) -> pa.RecordBatch:
    return pa.record_batch({"n": pa.array(range(rows), pa.int64())})


def test_the_digest_of_what_was_handed_over_needs_no_second_pass() -> None:
    pieces = IpcPieces(_batch(1).schema)
    produced = [pieces.encode(_batch(10)), pieces.encode(_batch(20)), pieces.encode(_batch(5))]
    first, second, _ = (len(p) for p in produced)

    def sha(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    # Every boundary of pieces produced ahead (an answer held whole) has its digest.
    assert pieces.sha256_of_first(0) == sha(b"")
    assert pieces.sha256_of_first(first) == sha(produced[0])
    assert pieces.sha256_of_first(first + second) == sha(produced[0] + produced[1])
    assert pieces.sha256_of_first(pieces.bytes_sent) == sha(b"".join(produced))
    with pytest.raises(ValueError, match="no digest of the first 5"):
        pieces.sha256_of_first(5)
    # Boundaries before what the transport took are forgotten: memory stays bounded.
    pieces.handed_over(first + second)
    with pytest.raises(ValueError):
        pieces.sha256_of_first(first)
    assert pieces.sha256_of_first(first + second) == sha(produced[0] + produced[1])
    produced.append(pieces.finish())
    assert pieces.sha256 == sha(b"".join(produced))
    assert read_ipc_pieces(produced)["n"].to_pylist() == [*range(10), *range(20), *range(5)]
