"""`connector audit show|verify|export`: who used what, and proof the record is whole."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from connector.audit_chain import read_entries, verify_log
from connector.cli.common import add_home, settings_of
from connector.decision_log import export_decision_log
from connector.errors import ConfigError
from connector.identity import load_ed25519_public, public_path
from connector.policy.ref import PolicyRef
from connector.safetext import escaped

# Requests, aggregates of a member's throttled refusals, and audit-log outages.
SHOWN_TYPES = ("request", "refusals", "outage")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the audit sub-commands."""
    group = commands.add_parser("audit", help="show, verify and export the audit log")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    show = actions.add_parser("show", help="list requests: who asked what, and what left")
    add_home(show)
    show.add_argument("--member", help="only requests of this member")
    show.add_argument("--dataset", help="only requests touching this dataset")
    show.add_argument("--since", type=_moment, help="only from this date or ISO time (UTC)")
    show.add_argument("--format", choices=("table", "json"), default="table")
    show.set_defaults(run=_show)

    verify = actions.add_parser(
        "verify", help="check the hash chain and signed checkpoints; exit 0 only if intact"
    )
    add_home(verify)
    verify.set_defaults(run=_verify)

    export = actions.add_parser("export", help="write the log as JSON Lines (for a SIEM)")
    add_home(export)
    export.add_argument("--output", type=Path, metavar="FILE", help="default: stdout")
    export.add_argument(
        "--format",
        choices=("jsonl", "opa-decision-log"),
        default="jsonl",
        help="jsonl: the entries as they are; opa-decision-log: one OPA decision-log event "
        "per decision (throttled refusals: one event per aggregate, with its count)",
    )
    export.set_defaults(run=_export)


def _moment(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date or ISO time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _requests(args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    path = settings_of(args).audit_log
    if not path.exists():
        return
    try:
        entries = list(read_entries(path))
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}; run `connector audit verify`") from None
    # An answer whose "opened" entry has no final entry is still streaming, or the server
    # stopped in the middle of it: shown, since bytes may have left.
    finished = {e.get("request_id") for e in entries if e.get("type") == "request"}
    for entry in entries:
        unfinished = entry.get("type") == "opened" and entry.get("request_id") not in finished
        if (entry.get("type") in SHOWN_TYPES or unfinished) and _wanted(entry, args):
            yield entry


def _wanted(entry: dict[str, Any], args: argparse.Namespace) -> bool:
    if args.member and entry.get("member_id") != args.member:
        return False
    if args.dataset and args.dataset not in entry.get("datasets", []):
        return False
    return not (args.since and dt.datetime.fromisoformat(entry["time"]) < args.since)


def _summary_line(entry: dict[str, Any]) -> str:
    """A refusals aggregate or an outage as one table line (escaped)."""
    head = f"{escaped(entry.get('seq')):>6} {escaped(str(entry.get('time', ''))[:19])}"
    if entry.get("type") == "refusals":
        outcomes = ", ".join(f"{k} {v}" for k, v in entry.get("outcomes", {}).items())
        return escaped(
            f"{head} refusals {entry.get('member_id') or '-'}: {entry.get('count')} more "
            f"refused requests counted, not listed ({outcomes}), {entry.get('first')} .. "
            f"{entry.get('last')}"
        )
    refused = sum(entry.get("refused", {}).values())
    return escaped(
        f"{head} outage   the audit log could not be written from {entry.get('from')} until "
        f"{entry.get('until')} ({entry.get('cause')}): {refused} requests refused, "
        f"{entry.get('late_entries', 0)} entries written late"
    )


def _show(args: argparse.Namespace) -> int:
    entries = list(_requests(args))
    if args.format == "json":
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        if e.get("type") == "opened":
            print(_table_line({**e, "outcome": "opened"}))
            print(
                f"{'':>7}note: no final entry (still streaming, or the server stopped mid-answer)"
            )
            continue
        if e.get("type") != "request":
            print(_summary_line(e))
            continue
        print(_table_line(e))
        for reason in e.get("reasons", []):
            print(f"{'':>7}reason: {escaped(reason)}")
    return 0


def _table_line(entry: dict[str, Any]) -> str:
    """One entry as a table line; every field is escaped (peers control many of them)."""
    policies = ",".join(
        str(PolicyRef(str(p.get("id")), p.get("version", 0))) for p in entry.get("policies", [])
    )
    datasets = ",".join(str(d) for d in entry.get("datasets", [])) or "-"
    fields = [
        f"{escaped(entry.get('seq')):>6}",
        escaped(str(entry.get("time", ""))[:19]),
        f"{escaped(entry.get('kind', '')):<7}",
        f"{escaped(entry.get('member_id') or '-'):<18}",
        f"{escaped(entry.get('outcome', '')):<15}",
        f"{escaped(datasets):<20}",
        f"rows={escaped(entry.get('rows', 0))}",
        escaped(policies),
    ]
    return " ".join(fields)


def _verify(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    verdict = verify_log(settings.audit_log, load_ed25519_public(public_path(settings.receipt_key)))
    print(f"{settings.audit_log}: {verdict.message}")
    return 0 if verdict.intact else 1


def _export(args: argparse.Namespace) -> int:
    if args.format == "opa-decision-log":
        return export_decision_log(settings_of(args), args.output)
    path = settings_of(args).audit_log
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        if path.exists():
            for entry in read_entries(path):
                out.write(json.dumps(entry, sort_keys=True) + "\n")
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}; run `connector audit verify`") from None
    finally:
        if args.output:
            out.close()
    return 0
