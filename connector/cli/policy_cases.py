"""`connector policy test`: run plain policy test cases through the server's own code."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

from connector.cli.common import add_home, settings_of
from connector.safetext import escaped


def add_to(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `policy test` to the policy sub-commands."""
    test = actions.add_parser(
        "test",
        help="run policy test cases (YAML: name, member, purpose, sql, at, expect) through "
        "the same guard, decision and shaping as the server; no server, nothing written",
    )
    add_home(test)
    test.add_argument("cases", nargs="+", type=Path, metavar="CASES.yaml", help="case files")
    test.add_argument(
        "--policies",
        type=Path,
        metavar="DIR",
        help="test these unsigned draft policies instead of the home's signed ones",
    )
    test.set_defaults(run=_test)


def _test(args: argparse.Namespace) -> int:
    # Imported here: the test runner loads the whole server side, which other policy
    # commands do not need.
    from connector.policy_cases import (
        CaseRunner,
        engine_factory_for,
        mismatch,
        read_cases,
        verdict_notes,
    )

    settings = settings_of(args)
    cases = [case for path in args.cases for case in read_cases(path)]  # all checked first
    now = dt.datetime.now(dt.UTC)
    failed = 0
    with CaseRunner(settings, args.policies, engine_factory_for(settings)) as runner:
        source = runner.source
        if source.signed:
            print(escaped(f"policies: the signed policies in {source.directory}"))
        else:
            print(
                escaped(
                    f"policies: UNSIGNED DRAFTS in {source.directory} (not the policies in "
                    "force; sign them with `connector policy sign` or `publish` before they count)"
                )
            )
        for note in verdict_notes(source, now):
            print(escaped(f"note: {note}"), file=sys.stderr)
        print(f"engine: {settings.policies.engine}; data: {settings.database}")
        for case in cases:
            problem = mismatch(case.expect, runner.run(case, now))
            failed += problem is not None
            print(
                escaped(f"PASS {case.name}" if problem is None else f"FAIL {case.name}: {problem}")
            )
    print(f"{len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0
