"""`connector query` with several members (`--to A --to B`, `--to role:ROLE`, `--all`): one
question, each member's own answer or refusal, one combined result and every receipt."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from connector.cli.common import settings_of
from connector.client import PeerIdentity
from connector.config import Settings
from connector.errors import ConfigError
from connector.federation_targets import Target, resolve_targets
from connector.held_directory import load_held
from connector.result_files import write_text
from connector.safetext import escaped

if TYPE_CHECKING:
    from connector.federated_answers import FederatedResult, MemberReport

EXIT_INCOMPLETE = 1


def is_federated(args: argparse.Namespace) -> bool:
    """True when the arguments ask more than one member, or a role, or all of them."""
    targets = args.to or []
    return bool(
        len(targets) > 1
        or args.all
        or args.per_member
        or args.require_all
        or any(t.startswith("role:") for t in targets)
    )


def targets_of(args: argparse.Namespace, settings: Settings) -> list[Target]:
    """The members the arguments name, resolved through the home's directory."""
    specs = list(args.to or [])
    needs_directory = args.all or any(":" not in s or s.startswith("role:") for s in specs)
    directory = (
        load_held(settings.home, settings.ca.read_bytes(), settings.dataspace)
        if needs_directory
        else None
    )
    return resolve_targets(
        specs, everyone=args.all, directory=directory, own_member=settings.member_id
    )


def _progress(report: MemberReport, done: int, total: int, rows: int) -> None:
    print(f"\r{done}/{total} members done, {rows} rows so far", end="", file=sys.stderr)
    if done == total:
        print(file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Ask every member named; print the combined answer and the per-member report."""
    # Imported here: combining answers needs DuckDB, which asking one member does not.
    from connector.federated_receipts import save_result
    from connector.federation import FederatedQuery

    if args.format in ("parquet", "arrow") and args.output is None:
        raise ConfigError(f"--format {args.format} needs --output FILE")
    settings = settings_of(args)
    targets = targets_of(args, settings)
    identity = PeerIdentity.from_files(settings.cert, settings.key, settings.ca)
    query = FederatedQuery(
        identity,
        targets,
        timeout=args.timeout,
        progress=_progress if sys.stderr.isatty() else None,
        parts_to=args.output,
    )
    result = query.run(args.sql, args.purpose, per_member=args.per_member, max_rows=args.max_rows)
    _report(result)
    if args.require_all and not result.complete:
        print("connector: error: not every member answered (--require-all)", file=sys.stderr)
        for report in result.reports:
            if report.part_file is not None:
                report.part_file.unlink(missing_ok=True)
        return EXIT_INCOMPLETE
    if args.output is None:
        write_text(result.table, args.format, sys.stdout)
    else:
        saved = save_result(result, args.output, args.format)
        print(escaped(f"saved {args.output}; receipts in {saved}"), file=sys.stderr)
    return 0


def _report(result: FederatedResult) -> None:
    """One line per member, then what is missing from the answer."""
    from connector.federated_answers import ANSWERED

    for report in result.reports:
        line = f"  {report.label} ({report.address}): {report.outcome}"
        if report.outcome == ANSWERED:
            line += f", {report.rows} rows in {report.seconds:.2f} s"
            if report.min_group_size:
                line += f" (aggregate-only: groups of at least {report.min_group_size} rows)"
            if report.cut:
                line += f", INCOMPLETE: {report.detail}"
        elif report.detail:
            line += f": {report.detail}"
        print(escaped(line), file=sys.stderr)
    answered = sum(r.answered for r in result.reports)
    status = "complete" if result.complete else "INCOMPLETE"
    print(
        escaped(f"{status}: {answered} of {len(result.reports)} members answered ({result.kind})"),
        file=sys.stderr,
    )
    for group in result.incomplete_groups[:50]:
        values = ", ".join(f"{k}={v}" for k, v in group["group"].items())
        print(
            escaped(
                f"  incomplete group {values}: not answered by {', '.join(group['members'])} "
                "(aggregate-only: it may have too few rows there)"
            ),
            file=sys.stderr,
        )
    if len(result.incomplete_groups) > 50:
        print(f"  ... {len(result.incomplete_groups) - 50} more incomplete groups", file=sys.stderr)
