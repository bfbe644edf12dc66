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
    produced = [pieces.encode(_batch(10)), pieces.encode(_batch(20))]
    everything = b"".join(produced)
    assert pieces.sha256_of_first(len(everything)) == hashlib.sha256(everything).hexdigest()
    # All but the latest piece: what a transport sent when it refused that piece.
    assert pieces.sha256_of_first(len(produced[0])) == hashlib.sha256(produced[0]).hexdigest()
    with pytest.raises(ValueError, match="no digest of the first 5"):
        pieces.sha256_of_first(5)
    produced.append(pieces.finish())
    assert pieces.sha256 == hashlib.sha256(b"".join(produced)).hexdigest()
    assert read_ipc_pieces(produced)["n"].to_pylist() == [*range(10), *range(20)]
