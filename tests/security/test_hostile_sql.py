"""Hostile SQL against a real server: every attack through its Provider in process, a
spread sample of each table over mutual TLS.

Each attack names the property it tests. For every one: the server refuses (or answers only
what the policy grants), stays up, and the next legitimate query works. In process, errors
come back as a remote peer receives them (tests/in_process.py). The file- and
catalog-access attacks run a second time against a server whose SQL guard is switched off,
to show the sandbox alone stops them. The attacks only read: one server serves the module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from connector.client import Peer
from connector.errors import (
    ConnectorError,
    PermissionDenied,
    QueryRejected,
    QueryTimeout,
    ResourceExhausted,
    StoreError,
)
from connector.sqlguard import QueryShape
from tests.conftest import Space
from tests.in_process import InProcessPeer

PURPOSE = "quality-benchmarking"
T = TypeVar("T")
REFUSED = (QueryRejected, PermissionDenied, StoreError, ResourceExhausted, QueryTimeout)

# (property tested, attack)
FILE_AND_NETWORK = [
    ("no file read via read_csv", "SELECT * FROM read_csv('/etc/passwd')"),
    ("no file read via read_csv_auto", "SELECT * FROM read_csv_auto('/etc/hosts')"),
    ("no file read via read_text", "SELECT * FROM read_text('/etc/hostname')"),
    ("no file read via read_blob", "SELECT * FROM read_blob('/etc/hostname')"),
    ("no file read via read_json", "SELECT * FROM read_json('/etc/hosts')"),
    ("no file read via read_parquet", "SELECT * FROM read_parquet('/tmp/x.parquet')"),
    ("no file read via parquet_scan", "SELECT * FROM parquet_scan('/tmp/x.parquet')"),
    ("no file listing via glob", "SELECT * FROM glob('/*')"),
    ("no file sniffing (CVE-2024-41672)", "SELECT * FROM sniff_csv('/etc/passwd')"),
    ("no replacement scan of a path", "SELECT * FROM '/etc/passwd'"),
    ("no replacement scan of a csv", "SELECT * FROM 'data.csv'"),
    ("no replacement scan in a join", "SELECT * FROM part_defects, '/etc/passwd'"),
    ("no http URL", "SELECT * FROM read_csv('http://127.0.0.1:1/x.csv')"),
    ("no https URL", "SELECT * FROM 'https://127.0.0.1:1/x.parquet'"),
    ("no s3 URL", "SELECT * FROM read_parquet('s3://bucket/x.parquet')"),
    ("no file read in a subquery", "SELECT (SELECT count(*) FROM read_text('/etc/hosts'))"),
    ("no file read in a CTE", "WITH f AS (SELECT * FROM read_text('/etc/hosts')) SELECT * FROM f"),
    (
        "no file read behind UNION",
        "SELECT plant FROM part_defects UNION ALL SELECT content FROM read_text('/etc/hosts')",
    ),
    (
        "no file read in WHERE",
        "SELECT plant FROM part_defects WHERE EXISTS (SELECT 1 FROM read_text('/etc/hosts'))",
    ),
    ("no SQL from a string via query()", "SELECT * FROM query('SELECT 1')"),
    ("no table from a string via query_table()", "SELECT * FROM query_table('part_defects')"),
    ("no scalar query()", "SELECT query('SELECT 1')"),
    ("no serialized SQL execution", "SELECT json_execute_serialized_sql('{}')"),
]

STATEMENTS = [
    ("no COPY to a file", "COPY part_defects TO '/tmp/leak.csv'"),
    ("no COPY from a file", "COPY part_defects FROM '/etc/passwd'"),
    ("no EXPORT DATABASE", "EXPORT DATABASE '/tmp/leak'"),
    ("no IMPORT DATABASE", "IMPORT DATABASE '/tmp/leak'"),
    ("no ATTACH of a file", "ATTACH '/tmp/other.db' AS other"),
    ("no ATTACH in memory", "ATTACH ':memory:' AS m"),
    ("no DETACH", "DETACH datasets"),
    ("no INSTALL", "INSTALL httpfs"),
    ("no LOAD", "LOAD httpfs"),
    ("no SET", "SET enable_external_access = true"),
    ("no RESET", "RESET memory_limit"),
    ("no PRAGMA", "PRAGMA database_list"),
    ("no CALL", "CALL pragma_table_info('part_defects')"),
    ("no CREATE", "CREATE TABLE x AS SELECT 1"),
    ("no CREATE TEMP MACRO", "CREATE TEMP MACRO m() AS 1"),
    ("no SET VARIABLE", "SET VARIABLE v = 1"),
    ("no CHECKPOINT", "CHECKPOINT"),
    ("no INSERT", "INSERT INTO part_defects VALUES (1)"),
    ("no DELETE", "DELETE FROM part_defects"),
    ("no UPDATE", "UPDATE part_defects SET defects = 0"),
    ("no DROP", "DROP TABLE part_defects"),
    ("no EXPLAIN", "EXPLAIN SELECT * FROM part_defects"),
    ("no EXPLAIN ANALYZE", "EXPLAIN ANALYZE SELECT * FROM part_defects"),
    ("no DESCRIBE", "DESCRIBE part_defects"),
    ("no SUMMARIZE (statistics)", "SUMMARIZE part_defects"),
    ("no SHOW TABLES", "SHOW TABLES"),
    ("no PIVOT", "PIVOT part_defects ON plant USING sum(defects)"),
    ("no PREPARE", "PREPARE p AS SELECT 1"),
    ("no EXECUTE", "EXECUTE p"),
    ("no transaction control", "BEGIN TRANSACTION"),
    ("no USE", "USE datasets"),
    ("no VACUUM", "VACUUM"),
]

MULTI_AND_COMMENTS = [
    ("no second statement", "SELECT 1; DROP TABLE part_defects"),
    ("no second statement after a comment", "SELECT 1 /* x */; SET threads = 1"),
    ("no statement hidden after --", "SELECT 1; -- harmless\nCOPY part_defects TO '/tmp/x'"),
    ("no statement in a nested comment trick", "SELECT 1 /* /* */ ; ATTACH ':memory:' AS m"),
    ("no statement after a string with ;", "SELECT ';'; SET threads = 1"),
    ("no statement after a quoted identifier", 'SELECT 1 AS ";"; SET threads = 1'),
    ("no empty query", "   "),
    ("no comment-only query", "-- nothing"),
]

INTROSPECTION = [
    ("no settings via current_setting", "SELECT current_setting('memory_limit')"),
    ("no settings via duckdb_settings", "SELECT * FROM duckdb_settings()"),
    ("no table list via duckdb_tables", "SELECT * FROM duckdb_tables()"),
    ("no view SQL via duckdb_views", "SELECT sql FROM duckdb_views()"),
    ("no file path via duckdb_databases", "SELECT path FROM duckdb_databases()"),
    ("no columns via duckdb_columns", "SELECT * FROM duckdb_columns()"),
    ("no secrets", "SELECT * FROM duckdb_secrets()"),
    ("no memory map", "SELECT * FROM duckdb_memory()"),
    ("no extensions list", "SELECT * FROM duckdb_extensions()"),
    ("no functions list", "SELECT * FROM duckdb_functions()"),
    ("no pragma_table_info", "SELECT * FROM pragma_table_info('part_defects')"),
    ("no pragma_database_size", "SELECT * FROM pragma_database_size()"),
    ("no information_schema", "SELECT * FROM information_schema.tables"),
    ("no information_schema columns", "SELECT * FROM information_schema.columns"),
    ("no sqlite_master", "SELECT * FROM sqlite_master"),
    ("no pg_catalog", "SELECT * FROM pg_catalog.pg_tables"),
    ("no version()", "SELECT version()"),
    ("no getenv", "SELECT getenv('HOME')"),
    ("no platform", "SELECT * FROM pragma_platform()"),
    ("no metadata table", "SELECT * FROM _connector.datasets"),
    ("no variable read", "SELECT getvariable('x')"),
]

QUALIFIED_NAMES = [
    ("no schema-qualified dataset", "SELECT * FROM datasets.part_defects"),
    ("no catalog-qualified dataset", "SELECT * FROM data.datasets.part_defects"),
    ("no main schema", "SELECT * FROM main.part_defects"),
    ("no temp schema", "SELECT * FROM temp.main.part_defects"),
    ("no memory catalog", "SELECT * FROM memory.main.x"),
    ("no three-part column", "SELECT datasets.part_defects.supplier_price FROM part_defects"),
    ("no qualified function", "SELECT main.lower(plant) FROM part_defects"),
    ("no qualified table function", "SELECT * FROM main.read_csv('/etc/passwd')"),
    ("no quoted schema", 'SELECT * FROM "datasets"."part_defects"'),
    ("no hidden column", "SELECT supplier_price FROM part_defects"),
    ("no hidden column in WHERE", "SELECT plant FROM part_defects WHERE supplier_price > 100"),
    ("no hidden column in ORDER BY", "SELECT plant FROM part_defects ORDER BY supplier_price"),
    ("no hidden column in GROUP BY", "SELECT count(*) FROM part_defects GROUP BY supplier_price"),
    (
        "no hidden column in JOIN",
        "SELECT a.plant FROM part_defects a JOIN part_defects b "
        "ON a.supplier_price = b.supplier_price",
    ),
    (
        "no hidden column in a CTE",
        "WITH c AS (SELECT supplier_price FROM part_defects) SELECT * FROM c",
    ),
    (
        "no hidden column in a window",
        "SELECT rank() OVER (ORDER BY supplier_price) FROM part_defects",
    ),
    ("no hidden column via quoted name", 'SELECT "SUPPLIER_PRICE" FROM part_defects'),
    ("no ungranted dataset", "SELECT * FROM salaries"),
    ("no rowid", "SELECT rowid FROM part_defects"),
]

PARAMETERS_AND_UNICODE = [
    ("no positional parameter", "SELECT plant FROM part_defects WHERE defects = $1"),
    ("no question-mark parameter", "SELECT plant FROM part_defects WHERE defects = ?"),
    ("no named parameter", "SELECT plant FROM part_defects WHERE defects = $n"),
    ("no lambda", "SELECT list_transform([1, 2], x -> x + 1)"),
    ("no NUL byte", "SELECT plant FROM part_defects\x00; SET threads=1"),
    ("no fullwidth semicolon trick", "SELECT 1\uff1b SET threads = 1"),
    ("no homoglyph dataset", "SELECT * FROM part_d\u0435fects"),  # Cyrillic e
    ("no zero-width in a function name", "SELECT read\u200b_csv('/etc/passwd')"),
    ("no unicode-escaped path", "SELECT * FROM U&'/etc/passw\\0064'"),
]

RESOURCES = [
    (
        "no recursive CTE",
        "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
    ),
    ("no deeply nested expression", "SELECT " + "(" * 2000 + "1" + ")" * 2000),
    ("no long chain", "SELECT " + " + ".join(["1"] * 5000)),
    ("no giant string", "SELECT repeat('x', 2000000000)"),
    ("no huge range", "SELECT * FROM range(1000000000000)"),
    ("no generate_series", "SELECT * FROM generate_series(1, 1000000000000)"),
    ("no sample", "SELECT * FROM part_defects USING SAMPLE 50%"),
    ("no time travel", "SELECT * FROM part_defects AT (VERSION => 1)"),
    ("no oversized query", "SELECT 1 " + "-" * 200_000),
]

ERROR_LEAKS = [
    ("a failed cast does not echo the value", "SELECT CAST(plant AS INTEGER) FROM part_defects"),
    ("a failed date cast does not echo", "SELECT CAST(part_no AS DATE) FROM part_defects"),
    ("an overflow does not echo", "SELECT CAST(defects * 1000 AS TINYINT) FROM part_defects"),
    ("a bad regex does not echo", "SELECT regexp_matches(plant, '(') FROM part_defects"),
    ("an unknown column does not list others", "SELECT nope FROM part_defects"),
    ("an unknown table does not suggest the real one", "SELECT * FROM part_defect"),
]

ALL_ATTACKS = (
    FILE_AND_NETWORK
    + STATEMENTS
    + MULTI_AND_COMMENTS
    + INTROSPECTION
    + QUALIFIED_NAMES
    + PARAMETERS_AND_UNICODE
    + RESOURCES
    + ERROR_LEAKS
)
SECRETS = ("root:", "Regensburg", "Leipzig", "datasets.", "Did you mean", "/tmp/pytest", "100.5")


TABLES = (
    FILE_AND_NETWORK,
    STATEMENTS,
    MULTI_AND_COMMENTS,
    INTROSPECTION,
    QUALIFIED_NAMES,
    PARAMETERS_AND_UNICODE,
    RESOURCES,
    ERROR_LEAKS,
)


def over_the_wire(table: list[T], size: int = 10) -> list[T]:
    """A spread sample of an attack table that also runs over mutual TLS (every attack runs
    in process against the same server's Provider)."""
    if len(table) <= size:
        return list(table)
    return [table[round(i * (len(table) - 1) / (size - 1))] for i in range(size)]


WIRE_ATTACKS = [attack for table in TABLES for attack in over_the_wire(table)]


def _check_refused(peer: Peer | InProcessPeer, prop: str, sql: str) -> None:
    with pytest.raises(REFUSED) as refused:
        peer.query(sql, PURPOSE)
    text = str(refused.value)
    assert peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE)["n"][0].as_py() == 200
    for secret in SECRETS:
        assert secret not in text, f"{prop}: the refusal leaks {secret!r}: {text}"


@pytest.fixture(scope="module")
def in_process(shared_space: Space) -> InProcessPeer:
    """The grantee asking the module server's Provider (it holds only the grantee's
    certificate: made once, not read from the home again for each of ~180 attacks)."""
    return shared_space.in_process()


@pytest.fixture(scope="module")
def over_mtls(shared_space: Space) -> Iterator[Peer]:
    """The grantee's one mTLS channel to the module server, for every attack over the wire:
    each attack's check that the next query is answered runs on the channel it came by."""
    with shared_space.peer(timeout=60) as peer:
        yield peer


@pytest.mark.parametrize(("prop", "sql"), ALL_ATTACKS, ids=[p for p, _ in ALL_ATTACKS])
def test_attack_is_refused_and_the_provider_goes_on(
    in_process: InProcessPeer, prop: str, sql: str
) -> None:
    _check_refused(in_process, prop, sql)


@pytest.mark.parametrize(("prop", "sql"), WIRE_ATTACKS, ids=[p for p, _ in WIRE_ATTACKS])
def test_attack_over_mtls_is_refused_and_the_server_goes_on(
    over_mtls: Peer, prop: str, sql: str
) -> None:
    _check_refused(over_mtls, prop, sql)


def test_the_suite_is_large_enough() -> None:
    assert len(ALL_ATTACKS) >= 120
    assert len({sql for _, sql in ALL_ATTACKS}) == len(ALL_ATTACKS)


def _no_guard(sql: str) -> QueryShape:
    """A guard that checks nothing and claims the query reads part_defects (test only)."""
    return QueryShape(
        sql=sql,
        sha256=hashlib.sha256(sql.encode()).hexdigest(),
        datasets=("part_defects",),
        column_refs=frozenset(),
        uses_star=True,
    )


@pytest.fixture
def unguarded(shared_space: Space) -> Iterator[Space]:
    """The module's server with its guard switched off for one test (a test build)."""
    provider = shared_space.server.provider
    original: Callable[[str], QueryShape] = provider.guard
    provider.guard = _no_guard
    yield shared_space
    provider.guard = original


SANDBOX_ALONE = [
    (prop, sql)
    for prop, sql in FILE_AND_NETWORK + INTROSPECTION + QUALIFIED_NAMES[:9]
    if "parameter" not in prop
]
WIRE_SANDBOX_ALONE = over_the_wire(SANDBOX_ALONE, 12)


def _sandbox_stops(peer: Peer | InProcessPeer, prop: str, sql: str) -> None:
    try:
        table = peer.query(sql, PURPOSE)
    except ConnectorError as refused:
        assert isinstance(refused, REFUSED), f"{prop}: {refused!r}"
        text = str(refused)
        assert "root:" not in text and "datasets." not in text
    else:
        # What comes back may only be granted data (e.g. main.lower(plant) still reads
        # the per-request view) or a constant: no hidden column, no file content.
        assert "supplier_price" not in table.column_names, prop
        assert table.num_rows <= 200, prop
        assert "root:" not in str(table.to_pylist()), prop
    assert peer.query("SELECT count(*) AS n FROM part_defects", PURPOSE)["n"][0].as_py() == 200


@pytest.mark.parametrize(("prop", "sql"), SANDBOX_ALONE, ids=[p for p, _ in SANDBOX_ALONE])
def test_sandbox_alone_stops_file_and_catalog_access(
    unguarded: Space, in_process: InProcessPeer, prop: str, sql: str
) -> None:
    _sandbox_stops(in_process, prop, sql)


@pytest.mark.parametrize(
    ("prop", "sql"), WIRE_SANDBOX_ALONE, ids=[p for p, _ in WIRE_SANDBOX_ALONE]
)
def test_sandbox_alone_stops_file_and_catalog_access_over_mtls(
    unguarded: Space, over_mtls: Peer, prop: str, sql: str
) -> None:
    _sandbox_stops(over_mtls, prop, sql)
