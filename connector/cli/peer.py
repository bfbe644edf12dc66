"""`connector catalog|query|explain`: ask another member's connector, as a peer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from connector.cli.common import add_home, settings_of
from connector.client import Peer, PeerIdentity
from connector.errors import ConfigError, PermissionDenied
from connector.safetext import escaped

FORMATS = ("table", "csv", "json", "parquet", "arrow")
BINARY_FORMATS = ("parquet", "arrow")
RECEIPT_SUFFIX = ".receipt.json"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the peer sub-commands."""
    catalog = commands.add_parser("catalog", help="list the datasets a provider grants to you")
    _peer_arguments(catalog)
    catalog.add_argument("--format", choices=("table", "json"), default="table")
    catalog.set_defaults(run=_catalog)

    for name, run, text in (
        ("query", _query, "run one SELECT on a provider's datasets"),
        ("explain", _explain, "show the provider's decision for a query, without running it"),
    ):
        command = commands.add_parser(name, help=text)
        _peer_arguments(command)
        command.add_argument("--purpose", required=True, help="why you use the data")
        command.add_argument("sql", metavar="SQL")
        if name == "query":
            command.add_argument("--format", choices=FORMATS, default="table")
            command.add_argument(
                "--output",
                type=Path,
                metavar="FILE",
                help=f"default: stdout; the receipt is saved beside it as FILE{RECEIPT_SUFFIX} "
                "(--format arrow keeps the exact bytes the receipt's digest covers)",
            )
            command.add_argument("--max-rows", type=int, default=0, metavar="N")
        command.set_defaults(run=run)


def _peer_arguments(parser: argparse.ArgumentParser) -> None:
    add_home(parser)
    parser.add_argument("--to", required=True, metavar="HOST:PORT", help="the provider's address")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")


def _peer(args: argparse.Namespace) -> Peer:
    settings = settings_of(args)
    identity = PeerIdentity.from_files(settings.cert, settings.key, settings.ca)
    return Peer(args.to, identity, timeout=args.timeout)


def _catalog(args: argparse.Namespace) -> int:
    with _peer(args) as peer:
        entries = peer.catalog()
    if args.format == "json":
        rows = [
            {
                "dataset": e.name,
                "description": e.description,
                "columns": [
                    {"name": n, "type": t, **({"mask": e.masks[n]} if n in e.masks else {})}
                    for n, t in e.columns
                ],
                "row_filter": e.row_filter,
                "min_group_size": e.min_group_size,
                "purposes": list(e.purposes),
                "policies": [f"{p.id}@{p.version}" for p in e.policies],
                "valid_from": e.valid_from.isoformat(),
                "valid_until": e.valid_until.isoformat(),
                "max_rows_per_query": e.max_rows_per_query,
                "queries_per_day": e.queries_per_day,
                "rows_per_day": e.rows_per_day,
                "obligations": e.obligations,
            }
            for e in entries
        ]
        print(json.dumps(rows, indent=2))
        return 0
    if not entries:
        print(escaped(f"{args.to} grants you no datasets"))
    for e in entries:
        print(escaped(f"{e.name}: {e.description}"))
        print(
            escaped(f"  columns:  {', '.join(_column_text(n, t, e.masks) for n, t in e.columns)}")
        )
        if e.row_filter:
            print(escaped(f"  rows:     only where {e.row_filter}"))
        if e.min_group_size:
            print(escaped(f"  aggregate-only: groups of at least {e.min_group_size} rows"))
        print(escaped(f"  purposes: {', '.join(e.purposes)}"))
        print(escaped(f"  policies: {', '.join(f'{p.id}@{p.version}' for p in e.policies)}"))
        print(escaped(f"  valid:    {e.valid_from:%Y-%m-%d} .. {e.valid_until:%Y-%m-%d}"))
        limits = [
            f"{n} {what}"
            for n, what in (
                (e.max_rows_per_query, "rows per query"),
                (e.queries_per_day, "queries a day"),
                (e.rows_per_day, "rows a day"),
            )
            if n
        ]
        if limits:
            print(escaped(f"  limits:   {', '.join(limits)}"))
        for policy, terms in e.obligations.items():
            shown = {k: v for k, v in terms.items() if v}
            if shown:
                print(escaped(f"  you take on ({policy}): {json.dumps(shown)}"))
    return 0


def _explain(args: argparse.Namespace) -> int:
    with _peer(args) as peer:
        decision = peer.explain(args.sql, args.purpose)
    print("allowed" if decision.allow else "denied")
    for reason in decision.reasons:
        print(escaped(f"  reason: {reason}"))
    for policy in decision.policies:
        print(escaped(f"  policy: {policy.id}@{policy.version}"))
    for relation in decision.relations:
        print(escaped(f"  {relation.dataset}: columns {', '.join(relation.columns)}"))
        print(escaped(f"    runs on: {relation.definition}"))
        if relation.min_group_size:
            print(escaped(f"    aggregate-only: groups of at least {relation.min_group_size} rows"))
    if decision.query and decision.query != args.sql:
        print(escaped(f"  runs as: {decision.query}"))
    return 0 if decision.allow else 1


def _column_text(name: str, type_name: str, masks: dict[str, str]) -> str:
    return f"{name} {type_name} (masked: {masks[name]})" if name in masks else f"{name} {type_name}"


def _query(args: argparse.Namespace) -> int:
    if args.format in BINARY_FORMATS and args.output is None:
        raise ConfigError(f"--format {args.format} needs --output FILE")
    with _peer(args) as peer:
        try:
            result = peer.fetch(args.sql, args.purpose, max_rows=args.max_rows)
        except PermissionDenied as denied:
            raise PermissionDenied([f"{args.to} refused: {r}" for r in denied.reasons]) from None
    if args.output is None:
        _write(result.table, args.format, sys.stdout)
    else:
        if args.format == "parquet":
            pq.write_table(result.table, args.output)
        elif args.format == "arrow":
            args.output.write_bytes(result.arrow_ipc)
        else:
            with args.output.open("w", encoding="utf-8", newline="") as out:
                _write(result.table, args.format, out)
        result.bundle.save(args.output.with_name(args.output.name + RECEIPT_SUFFIX))
    receipt = result.receipt
    cut = " (cut at the row limit)" if receipt.truncated else ""
    policies = ", ".join(f"{p.id}@{p.version}" for p in receipt.policies)
    print(
        escaped(
            f"{receipt.rows} rows{cut} from {receipt.provider_id}, "
            f"request {receipt.request_id}, policies {policies}"
        ),
        file=sys.stderr,
    )
    return 0


def _write(table: pa.Table, fmt: str, out: IO[str]) -> None:
    if fmt == "csv":
        sink = pa.BufferOutputStream()
        pa_csv.write_csv(table, sink)
        out.write(sink.getvalue().to_pybytes().decode())
    elif fmt == "json":
        for row in table.to_pylist():
            out.write(json.dumps(row, default=str) + "\n")
    else:
        out.write(_as_text_table(table))


def _as_text_table(table: pa.Table) -> str:
    # Names and values come from the provider: escaped, so they cannot drive the terminal.
    rows = [[("" if v is None else escaped(v)) for v in row.values()] for row in table.to_pylist()]
    header = [escaped(name) for name in table.column_names]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines) + "\n"
