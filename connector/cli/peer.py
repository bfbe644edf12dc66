"""`connector catalog|query|explain`: ask another member's connector, as a peer."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from connector.cli import federated
from connector.cli.common import add_home, settings_of
from connector.client import NoiseInfo, Peer, PeerIdentity
from connector.errors import ConfigError, ConnectorError, PermissionDenied
from connector.federation_targets import check_member_endpoint
from connector.held_directory import load_held
from connector.policy.ref import joined
from connector.result_files import ARROW_SUFFIX, FORMATS, save, write_text
from connector.safetext import escaped

BINARY_FORMATS = ("parquet", "arrow")
RECEIPT_SUFFIX = ".receipt.json"


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the peer sub-commands."""
    catalog = commands.add_parser("catalog", help="list the datasets a provider grants to you")
    _peer_arguments(catalog)
    catalog.add_argument(
        "--format", choices=("table", "json"), default="table", help="default: %(default)s"
    )
    catalog.set_defaults(run=_catalog)

    for name, run, text in (
        ("query", _query, "run one SELECT on one provider's datasets, or on several members'"),
        ("explain", _explain, "show the provider's decision for a query, without running it"),
    ):
        command = commands.add_parser(name, help=text)
        _peer_arguments(command, many=name == "query")
        command.add_argument("--purpose", required=True, help="why you use the data")
        command.add_argument(
            "sql", metavar="SQL", help="one SELECT over the dataset names of your catalog"
        )
        if name == "query":
            command.add_argument(
                "--format", choices=FORMATS, default="table", help="default: %(default)s"
            )
            command.add_argument(
                "--output",
                type=Path,
                metavar="FILE",
                help=f"default: stdout; the receipt is saved beside it as FILE{RECEIPT_SUFFIX} "
                f"and, unless --format arrow, the exact Arrow bytes it signs as FILE{ARROW_SUFFIX}",
            )
            _federation_arguments(command)
            command.add_argument(
                "--max-rows",
                type=int,
                default=0,
                metavar="N",
                help="cut the result at N rows (0: the policy's limit only)",
            )
        command.add_argument(
            "--since-version",
            type=int,
            default=0,
            metavar="N",
            help="only the rows appended after version N of the dataset (the version your "
            "last read covered: see its receipt or the catalog)",
        )
        command.set_defaults(run=run)


def _peer_arguments(parser: argparse.ArgumentParser, *, many: bool = False) -> None:
    add_home(parser)
    parser.add_argument(
        "--to",
        required=not many,
        action="append" if many else "store",
        metavar="MEMBER",
        help="the provider: a member id (looked up in the member directory, its certificate "
        "checked), or HOST:PORT"
        + ("; repeat, or role:ROLE, to ask several members at once" if many else ""),
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="give up after this long (default: %(default)s); the provider stops the query",
    )


def _federation_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--all", action="store_true", help="ask every member of the directory (but yourself)"
    )
    command.add_argument(
        "--per-member",
        action="store_true",
        help="with several members: each member's own answer with _member, not combined",
    )
    command.add_argument(
        "--require-all",
        action="store_true",
        help="with several members: fail (exit 1, no answer) unless every member answers",
    )


def _peer(args: argparse.Namespace) -> Peer:
    settings = settings_of(args)
    identity = PeerIdentity.from_files(settings.cert, settings.key, settings.ca)
    spec = args.to if isinstance(args.to, str) else args.to[0]
    targets = federated.targets_of(argparse.Namespace(to=[spec], all=False), settings)
    if len(targets) != 1:
        raise ConfigError(
            f"{spec} names {len(targets)} members; this command asks one (a member id or "
            "HOST:PORT); `connector query` asks several"
        )
    (target,) = targets
    check_member_endpoint(target, identity, settings.dataspace, args.timeout)
    return Peer(target.address, identity, timeout=args.timeout)


def _provider_name(args: argparse.Namespace, address: str) -> str:
    """The provider's display name and id as the member directory held lists them, when it
    was named by member id (its certificate then checked); "" otherwise."""
    settings = settings_of(args)
    try:
        directory = load_held(settings.home, settings.ca.read_bytes(), settings.dataspace)
    except (OSError, ConnectorError):
        return ""
    for member in directory.members if directory else ():
        if member.id == args.to and address in member.endpoints:
            return f"{member.name} ({member.id})"
    return ""


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
                **_noise_json(e.noise, e.group_by),
                "purposes": list(e.purposes),
                "policies": [str(p) for p in e.policies],
                "valid_from": e.valid_from.isoformat(),
                "valid_until": e.valid_until.isoformat(),
                "max_rows_per_query": e.max_rows_per_query,
                "queries_per_day": e.queries_per_day,
                "rows_per_day": e.rows_per_day,
                "max_bytes_per_query": e.max_bytes_per_query,
                "bytes_per_day": e.bytes_per_day,
                "obligations": e.obligations,
                "version": e.version,
            }
            for e in entries
        ]
        print(json.dumps(rows, indent=2))
        return 0
    provider = _provider_name(args, peer.address)
    if provider:
        print(escaped(f"{provider}, at {peer.address}:"))
    if not entries:
        print(escaped(f"{args.to} grants you no datasets"))
    for e in entries:
        print(escaped(f"{e.name}: {e.description}"))
        print(escaped(f"  version:  {e.version}"))
        print(
            escaped(f"  columns:  {', '.join(_column_text(n, t, e.masks) for n, t in e.columns)}")
        )
        if e.row_filter:
            print(escaped(f"  rows:     only where {e.row_filter}"))
        if e.min_group_size:
            print(escaped(f"  aggregate-only: groups of at least {e.min_group_size} rows"))
        for line in _noise_lines(e.noise, e.group_by):
            print(escaped(f"  {line}"))
        print(escaped(f"  purposes: {', '.join(e.purposes)}"))
        print(escaped(f"  policies: {joined(e.policies)}"))
        print(escaped(f"  valid:    {e.valid_from:%Y-%m-%d} .. {e.valid_until:%Y-%m-%d}"))
        limits = [
            f"{n} {what}"
            for n, what in (
                (e.max_rows_per_query, "rows per query"),
                (e.queries_per_day, "queries a day"),
                (e.rows_per_day, "rows a day"),
                (e.max_bytes_per_query, "bytes per query"),
                (e.bytes_per_day, "bytes a day"),
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
        decision = peer.explain(args.sql, args.purpose, since_version=args.since_version)
    print("allowed" if decision.allow else "denied")
    for reason in decision.reasons:
        print(escaped(f"  reason: {reason}"))
    for policy in decision.policies:
        print(escaped(f"  policy: {policy}"))
    for relation in decision.relations:
        print(escaped(f"  {relation.dataset}: columns {', '.join(relation.columns)}"))
        print(escaped(f"    runs on: {relation.definition}"))
        if relation.min_group_size:
            print(escaped(f"    aggregate-only: groups of at least {relation.min_group_size} rows"))
        for line in _noise_lines(relation.noise, relation.group_by):
            print(escaped(f"    {line}"))
    if decision.query and decision.query != args.sql:
        print(escaped(f"  runs as: {decision.query}"))
    return 0 if decision.allow else 1


def _noise_lines(noise: NoiseInfo | None, group_by: tuple[tuple[str, ...], ...]) -> list[str]:
    """The noise terms, the privacy budget left and the declared grouping sets."""
    lines = []
    if group_by:
        lines.append("group by only: " + "; ".join(", ".join(g) for g in group_by))
    if noise is not None:
        bounds = ", ".join(f"{c} in [{lo:g}, {hi:g}]" for c, (lo, hi) in noise.bounds.items())
        lines.append(
            f"noise: epsilon {noise.epsilon:g} a query (count, sum, avg only; sums of "
            f"{bounds or 'no column'})"
        )
        resets = (
            f", resets {noise.budget_resets_at:%Y-%m-%d %H:%M} UTC"
            if noise.budget_resets_at
            else ""
        )
        lines.append(
            f"privacy budget: {noise.epsilon_remaining:g} of {noise.epsilon_per_day:g} left "
            f"today{resets}"
        )
        lines += [f"noised: {m}" for m in noise.mechanisms]
    return lines


def _noise_json(noise: NoiseInfo | None, group_by: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    """The noise terms and grouping sets as JSON fields (none when the dataset has none)."""
    fields: dict[str, Any] = {}
    if group_by:
        fields["group_by"] = [list(g) for g in group_by]
    if noise is not None:
        fields["noise"] = {
            "epsilon": noise.epsilon,
            "epsilon_per_day": noise.epsilon_per_day,
            "bounds": {c: list(b) for c, b in noise.bounds.items()},
            "epsilon_remaining": noise.epsilon_remaining,
            "budget_resets_at": noise.budget_resets_at.isoformat()
            if noise.budget_resets_at
            else None,
        }
    return fields


def _column_text(name: str, type_name: str, masks: dict[str, str]) -> str:
    return f"{name} {type_name} (masked: {masks[name]})" if name in masks else f"{name} {type_name}"


def _query(args: argparse.Namespace) -> int:
    if not args.to and not args.all:
        raise ConfigError("name the members to ask: --to MEMBER (repeat), --to role:ROLE or --all")
    if federated.is_federated(args):
        return federated.run(args)
    if args.format in BINARY_FORMATS and args.output is None:
        raise ConfigError(f"--format {args.format} needs --output FILE")
    with _peer(args) as peer:
        try:
            result = peer.fetch(
                args.sql, args.purpose, max_rows=args.max_rows, since_version=args.since_version
            )
        except PermissionDenied as denied:
            refused = [f"{peer.address} refused: {r}" for r in denied.reasons]
            raise PermissionDenied(refused) from None
    if args.output is None:
        write_text(result.table, args.format, sys.stdout)
    else:
        save(result.table, result.arrow_ipc, args.format, args.output)
        bundle = dataclasses.replace(result.bundle, data_format=args.format)
        bundle.save(args.output.with_name(args.output.name + RECEIPT_SUFFIX))
    receipt = result.receipt
    cut = f" (cut at the limit {receipt.limited_by or 'of rows'})" if receipt.truncated else ""
    print(
        escaped(
            f"{receipt.rows} rows{cut} from {receipt.provider_id}, "
            f"request {receipt.request_id}, policies {joined(receipt.policies)}"
            + "".join(
                f", {name} versions {since + 1}..{version}"
                if since
                else f", {name} version {version}"
                for name, (since, version) in sorted(receipt.versions.items())
            )
        ),
        file=sys.stderr,
    )
    return 0
