"""`connector policy replay`: what draft policies would have done to the recorded traffic."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING

from connector.cli.common import add_home, settings_of
from connector.safetext import escaped

if TYPE_CHECKING:
    from connector.policy_replay import ReplayReport

QUERY_CHARS = 200  # a long query is shown shortened: the audit log holds it whole


def add_to(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the `replay` sub-command to the policy group."""
    parser = actions.add_parser(
        "replay",
        help="replay the requests in the audit log against draft policies and list every "
        "request whose outcome would change (writes nothing)",
    )
    add_home(parser)
    parser.add_argument(
        "--policies",
        type=Path,
        required=True,
        metavar="DRAFT_DIR",
        help="folder of draft policy files (*.yaml); they need not be signed",
    )
    parser.add_argument(
        "--since", type=_moment, help="only requests from this date or ISO time (UTC) on"
    )
    parser.add_argument(
        "--at",
        type=_at,
        metavar="now",
        help="decide every request as of now (default: as of the time it was made)",
    )
    parser.set_defaults(run=_replay)


def _moment(text: str) -> dt.datetime:
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date or ISO time (e.g. 2026-03-01 or 2026-03-01T12:00)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _at(text: str) -> dt.datetime:
    if text != "now":
        raise argparse.ArgumentTypeError(
            "--at takes only 'now' (leave it out for each request's time)"
        )
    return dt.datetime.now(dt.UTC)


def _replay(args: argparse.Namespace) -> int:
    # Imported here: replay loads the whole server side, which other policy commands do not need.
    from connector.policy_replay import replay

    report = replay(settings_of(args), args.policies, since=args.since, at=args.at)
    for line in report_lines(report):
        print(line)
    return 0


def report_lines(report: ReplayReport) -> list[str]:
    """The replay as the owner reads it: header, one block per change, summary last."""
    from connector.policy_replay import describe_outcome, draft_names

    when = "as of now" if report.at else "each as of the time it was made"
    lines = [
        escaped(
            f"replaying {report.audit_log} against the draft policies in {report.drafts}, {when}"
        )
    ]
    if report.unsigned:
        lines.append(
            escaped(
                f"note: unsigned drafts: {draft_names(report.unsigned)} (replay does not need "
                "signatures; the connector puts them in force only once signed by a trusted key)"
            )
        )
    for change in report.changes:
        request = change.request
        lines.append(
            escaped(
                f"CHANGED entry {request.seq} {request.time.isoformat(timespec='seconds')} "
                f"{request.kind} by {request.member}, purpose {request.purpose}: "
                f"{', '.join(_kind_text(k) for k in change.kinds)}"
            )
        )
        lines.append(f"  query: {escaped(request.query, QUERY_CHARS)}")
        reasons = change.draft.reasons if not change.draft.allowed else ()
        lines += [f"  reason: {escaped(r)}" for r in reasons]
        if "denied -> allowed" in change.kinds:
            lines.append(f"  now allowed by: {escaped(', '.join(change.draft.policies))}")
        if "columns" in change.kinds or "masks" in change.kinds:
            lines += [f"  then {escaped(t)}" for t in describe_outcome(request.then)]
            lines += [f"  draft {escaped(t)}" for t in describe_outcome(change.draft)]
    for skipped in report.not_replayable:
        lines.append(
            escaped(
                f"NOT REPLAYABLE entry {skipped.seq} (line {skipped.line}) by {skipped.member}: "
                f"{skipped.why}"
            )
        )
    lines.append(
        f"summary: {report.replayed} requests replayed: {len(report.changes)} would change "
        f"({report.count('allowed -> denied')} allowed -> denied, "
        f"{report.count('denied -> allowed')} denied -> allowed, "
        f"{report.count('columns')} columns differ, {report.count('masks')} masks differ), "
        f"{report.unchanged} unchanged; {len(report.not_replayable)} not replayable; "
        f"{report.without_query} catalog requests have no query to replay"
    )
    return lines


def _kind_text(kind: str) -> str:
    return {"columns": "columns differ", "masks": "masks differ"}.get(kind, kind)
