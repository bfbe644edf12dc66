"""`connector receipt verify`: a peer proves what it received, and from whom."""

from __future__ import annotations

import argparse
from pathlib import Path

from connector.cli.common import add_home, settings_of
from connector.errors import ConfigError, PeerError
from connector.jws import JwsError
from connector.receipt import ReceiptBundle, verify_bundle
from connector.safetext import escaped


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the receipt sub-commands."""
    group = commands.add_parser("receipt", help="check receipts kept beside query results")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify",
        help="check a receipt against the provider's certificate and, with --data, the result",
    )
    add_home(verify)
    verify.add_argument("receipt", type=Path, metavar="RECEIPT")
    verify.add_argument(
        "--data", type=Path, metavar="RESULT", help="the result as received (--format arrow)"
    )
    verify.set_defaults(run=_verify)


def _verify(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    try:
        bundle = ReceiptBundle.load(args.receipt)
        data = args.data.read_bytes() if args.data else None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {args.receipt} or its data: {exc}") from None
    try:
        fields = verify_bundle(bundle, settings.ca.read_bytes(), data)
    except JwsError as exc:
        raise PeerError(f"{args.receipt}: NOT VALID: {exc}") from None
    checked = "signature and data" if data is not None else "signature (no --data given)"
    policies = ", ".join(f"{p.id}@{p.version}" for p in fields.policies)
    print(
        escaped(
            f"{args.receipt}: valid ({checked}): {fields.rows} rows from {fields.provider_id} "
            f"to {fields.member_id}, request {fields.request_id}, purpose {fields.purpose}, "
            f"policies {policies}, issued {fields.issued_at}, audit entry {fields.audit_seq}"
        )
    )
    return 0
