"""The two Flight SQL clients `make bench` reads the connector's Flight SQL port with:
pyarrow's FlightClient (GetFlightInfo, then DoGet) and ADBC's Flight SQL driver (DB-API).
Each keeps its connection open across calls, as a peer's tool does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow.flight as flight
from adbc_driver_flightsql import DatabaseOptions

from connector._proto.flight_sql_pb2 import CommandStatementQuery
from connector.client import PeerIdentity
from connector.flight_sql import pack
from connector.flight_status import PURPOSE_HEADER

Fetch = Callable[[], tuple[int, int]]  # one query: rows and Arrow bytes received


def flight_client_fetch(port: int, identity: PeerIdentity, sql: str, purpose: str) -> Fetch:
    """One query through pyarrow's FlightClient: GetFlightInfo, then DoGet of its ticket."""
    return _fetch_with(_client(port, identity), sql, purpose)


@contextmanager
def flight_client_session(
    port: int, identity: PeerIdentity, sql: str, purpose: str
) -> Iterator[Fetch]:
    """flight_client_fetch on a client of its own, closed when the block ends."""
    with closing(_client(port, identity)) as client:
        yield _fetch_with(client, sql, purpose)


def _client(port: int, identity: PeerIdentity) -> flight.FlightClient:
    return flight.FlightClient(
        f"grpc+tls://localhost:{port}",
        tls_root_certs=identity.ca_pem,
        cert_chain=identity.cert_pem,
        private_key=identity.key_pem,
    )


def _fetch_with(client: flight.FlightClient, sql: str, purpose: str) -> Fetch:
    options = flight.FlightCallOptions(headers=[(PURPOSE_HEADER.encode(), purpose.encode())])
    command = flight.FlightDescriptor.for_command(pack(CommandStatementQuery(query=sql)))

    def once() -> tuple[int, int]:
        info = client.get_flight_info(command, options)
        rows = size = 0
        for chunk in client.do_get(info.endpoints[0].ticket, options):
            rows += chunk.data.num_rows
            size += chunk.data.nbytes
        return rows, size

    return once


@contextmanager
def adbc_fetch(port: int, identity: PeerIdentity, sql: str, purpose: str) -> Iterator[Fetch]:
    """One query through ADBC's DB-API (execute, fetch_arrow_table) on one open connection."""
    options = {
        DatabaseOptions.TLS_ROOT_CERTS.value: identity.ca_pem.decode(),
        DatabaseOptions.MTLS_CERT_CHAIN.value: identity.cert_pem.decode(),
        DatabaseOptions.MTLS_PRIVATE_KEY.value: identity.key_pem.decode(),
        f"{DatabaseOptions.RPC_CALL_HEADER_PREFIX.value}{PURPOSE_HEADER}": purpose,
    }
    uri = f"grpc+tls://localhost:{port}"
    with (
        flightsql.connect(uri, db_kwargs=options, autocommit=True) as connection,
        connection.cursor() as cursor,
    ):

        def once() -> tuple[int, int]:
            cursor.execute(sql)
            table = cursor.fetch_arrow_table()
            return table.num_rows, table.nbytes

        yield once
