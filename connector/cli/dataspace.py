"""`connector dataspace init|issue`: a development CA and member certificates."""

from __future__ import annotations

import argparse
from pathlib import Path

from connector.cli.common import add_home, add_hosts, hosts_of
from connector.identity import create_dataspace_ca, issue_member_certificate


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the dataspace sub-commands."""
    group = commands.add_parser(
        "dataspace", help="make a development data-space CA and certificates"
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    init = actions.add_parser("init", help="create a development CA (DIR/ca.pem, DIR/ca.key)")
    init.add_argument("dir", type=Path, metavar="DIR")
    init.add_argument("--name", required=True, help="the data space's name (SPIFFE trust domain)")
    add_home(init)
    init.set_defaults(run=_init)

    issue = actions.add_parser(
        "issue",
        help="issue a member certificate signed by the CA in DIR (again for an existing "
        "member: a new certificate and key to rotate to)",
    )
    issue.add_argument("dir", type=Path, metavar="DIR")
    issue.add_argument("member_id", metavar="MEMBER_ID")
    issue.add_argument("--out", type=Path, required=True, metavar="OUTDIR")
    add_hosts(issue)
    issue.add_argument("--display-name", help="organisation name shown to peers (subject O)")
    add_home(issue)
    issue.set_defaults(run=_issue)


def _init(args: argparse.Namespace) -> int:
    cert = create_dataspace_ca(args.dir, args.name)
    print(
        f"data space {args.name!r}: CA certificate {cert}, "
        f"key {args.dir / 'ca.key'} (keep it secret)"
    )
    return 0


def _issue(args: argparse.Namespace) -> int:
    hosts = hosts_of(args)
    cert = issue_member_certificate(
        args.dir, args.member_id, args.out, hosts=hosts, display_name=args.display_name
    )
    print(
        f"member {args.member_id}: certificate {cert}, key {args.out / 'key.pem'}; "
        f"hosts {', '.join(hosts)}"
    )
    return 0
