"""`connector policy explain|diff`: read a policy, or a change to one, as a legal team would."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from connector.cli.common import add_home, datasets_or_note, settings_of
from connector.config import CONFIG_FILE, HOME_ENV, Settings, resolve_home
from connector.errors import PolicyError
from connector.policy.diff import Change, diff_policies, widens
from connector.policy.diff_sets import diff_sets, load_policies
from connector.policy.explain import explanation, explanation_lines, nested_grouping_warnings
from connector.policy.filter_order import Direction
from connector.policy.fit import fit_warnings
from connector.policy.model import UsagePolicy, parse_policy
from connector.policy.signing import trusted_keys, verify_policy
from connector.safetext import escaped
from connector.store import DatasetInfo

EXIT_WIDENS = 1
EXIT_UNREADABLE = 2  # not 1: a review step must not read a broken file as "widens" or "fine"


def add_to(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `policy explain` and `policy diff`."""
    explain = actions.add_parser(
        "explain", help="say in plain language what a policy lets whom do (text or JSON)"
    )
    add_home(explain)
    explain.add_argument("file", type=Path, metavar="FILE", help="the policy file (.yaml)")
    _add_format(explain)
    explain.set_defaults(run=_explain)

    diff = actions.add_parser(
        "diff",
        help="what NEW grants and takes away compared with OLD (files or folders); exit 0 when "
        f"nothing widens, {EXIT_WIDENS} when something widens, {EXIT_UNREADABLE} when a file "
        "cannot be read",
    )
    diff.add_argument("old", type=Path, metavar="OLD", help="the policy file or folder in force")
    diff.add_argument("new", type=Path, metavar="NEW", help="the new policy file or folder")
    _add_format(diff)
    diff.set_defaults(run=_diff)


def _add_format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--format", choices=("text", "json"), default="text", help="text (default) or json"
    )


def _explain(args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        raise PolicyError("no such file; give the path of a policy file (.yaml)", path=str(path))
    policy = parse_policy(path)
    settings = _home_or_none(args)
    datasets = datasets_or_note(settings) if settings else None
    status = _signature_status(path, settings) if settings else None
    warnings = nested_grouping_warnings(policy.shaping)
    if datasets is not None:
        warnings += fit_warnings(policy, datasets)
    if args.format == "json":
        explained = explanation(policy, datasets)
        explained["status"] = status
        explained["warnings"] = warnings
        print(json.dumps(explained, indent=2))
        return 0
    for line in _explain_text(policy, datasets, status, warnings):
        print(escaped(line))
    return 0


def _explain_text(
    policy: UsagePolicy,
    datasets: Mapping[str, DatasetInfo] | None,
    status: str | None,
    warnings: list[str],
) -> list[str]:
    lines = explanation_lines(policy, datasets)
    if status is not None:
        lines.append(f"Signature and dates: {status}")
    return lines + [f"WARNING: {warning}" for warning in warnings]


def _home_or_none(args: argparse.Namespace) -> Settings | None:
    """The home's settings; None (with a note) when no home was named and none is here."""
    home = resolve_home(args.home)
    named = args.home is not None or HOME_ENV in os.environ
    if not named and not (home / CONFIG_FILE).exists():
        print("note: no home here: datasets and signature not checked", file=sys.stderr)
        return None
    return settings_of(args)


def _signature_status(path: Path, settings: Settings) -> str:
    trusted = trusted_keys(settings.policies.trusted_signers.values())
    verdict = verify_policy(path, trusted, dt.datetime.now(dt.UTC))
    return f"{verdict.status.value}: {verdict.message}"


def _diff(args: argparse.Namespace) -> int:
    try:
        if args.old.is_file() and args.new.is_file():
            changes = diff_policies(parse_policy(args.old), parse_policy(args.new))
        else:
            changes = diff_sets(load_policies(args.old), load_policies(args.new))
    except PolicyError as error:
        print(f"connector: error: {escaped(error)}", file=sys.stderr)
        return EXIT_UNREADABLE
    if args.format == "json":
        body = {"widens": widens(changes), "changes": [c.as_json() for c in changes]}
        print(json.dumps(body, indent=2))
    else:
        for line in diff_lines(changes):
            print(escaped(line))
    return EXIT_WIDENS if widens(changes) else 0


def diff_lines(changes: list[Change]) -> list[str]:
    """The changes grouped by policy, then a summary line."""
    lines = []
    current = None
    for change in changes:
        if change.policy != current:
            current = change.policy
            lines.append(f"policy {current}:")
        lines.append(f"  {change.direction.value.upper():<10} {change.area}: {change.text}")
    wider = sum(c.direction is Direction.WIDENS for c in changes)
    narrower = sum(c.direction is Direction.NARROWS for c in changes)
    if not wider and not narrower:
        lines.append("no change to what is granted")
    elif wider:
        lines.append(
            f"{wider} widening, {narrower} narrowing: access grows; ask for a second signature"
        )
    else:
        lines.append(f"0 widening, {narrower} narrowing: nothing widens")
    return lines
