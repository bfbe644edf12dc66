"""`connector dataspace init|issue|member|publish`: a development CA, member certificates and
the signed member directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from connector.cli.common import add_home, add_hosts, hosts_of
from connector.directory import MemberEntry, describe, signature_path
from connector.directory_draft import add_member, publish, read_draft, remove_member
from connector.identity import create_dataspace_ca, issue_member_certificate
from connector.safetext import escaped


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
    _register_directory(actions)


def _register_directory(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    member = actions.add_parser("member", help="edit the member directory kept beside the CA")
    steps = member.add_subparsers(dest="step", required=True, metavar="STEP")
    add = steps.add_parser("add", help="add a member to the directory (or change its entry)")
    add.add_argument("dir", type=Path, metavar="DIR", help="the folder of the data-space CA")
    add.add_argument("member_id", metavar="ID")
    add.add_argument(
        "--endpoint",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="where the member's connector answers (repeat for several; none for a member "
        "that only asks)",
    )
    add.add_argument(
        "--role", action="append", default=[], metavar="ROLE", help="oem, supplier, ... (repeat)"
    )
    add.add_argument("--country", default="", metavar="CC", help="two-letter country code")
    add.add_argument("--name", default="", metavar="NAME", help="display name (default: the id)")
    add.set_defaults(run=_member_add)
    remove = steps.add_parser("remove", help="take a member out of the directory")
    remove.add_argument("dir", type=Path, metavar="DIR")
    remove.add_argument("member_id", metavar="ID")
    remove.set_defaults(run=_member_remove)
    listing = steps.add_parser("list", help="list the members of the directory draft")
    listing.add_argument("dir", type=Path, metavar="DIR")
    listing.set_defaults(run=_member_list)

    publish_command = actions.add_parser(
        "publish", help="sign the directory with the CA key as a new version"
    )
    publish_command.add_argument("dir", type=Path, metavar="DIR")
    publish_command.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="FILE and FILE.jws are written"
    )
    publish_command.set_defaults(run=_publish)


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


def _member_add(args: argparse.Namespace) -> int:
    entry = MemberEntry(
        args.member_id,
        args.name or args.member_id,
        tuple(args.endpoint),
        tuple(dict.fromkeys(args.role)),
        args.country,
    )
    replaced = add_member(args.dir, entry)
    what = "changed" if replaced else "added"
    print(escaped(f"member {args.member_id} {what}; publish the directory to make it known"))
    return 0


def _member_remove(args: argparse.Namespace) -> int:
    remove_member(args.dir, args.member_id)
    print(escaped(f"member {args.member_id} removed; publish the directory to make it known"))
    return 0


def _member_list(args: argparse.Namespace) -> int:
    draft = read_draft(args.dir)
    for line in describe(sorted(draft.members, key=lambda m: m.id)):
        print(escaped(line))
    print(f"{len(draft.members)} members; last published version {draft.published_version}")
    return 0


def _publish(args: argparse.Namespace) -> int:
    directory = publish(args.dir, args.out)
    print(
        escaped(
            f"directory version {directory.version} of {directory.dataspace}: "
            f"{len(directory.members)} members, {args.out} signed in "
            f"{signature_path(args.out)}; members take it with "
            f"`connector directory update --home HOME {args.out}`"
        )
    )
    return 0
