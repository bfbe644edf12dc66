"""`connector receipt verify`: a peer proves what it received, and from whom.

Anyone holding the data space's CA can check a receipt: `--ca CA.pem` needs no home.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from connector.arrow_stream import read_ipc_pieces
from connector.cli.common import settings_of
from connector.config import HOME_ENV
from connector.errors import ConfigError, PeerError
from connector.federated_receipts import is_federated_receipts, verify_receipts
from connector.jws import JwsError
from connector.policy.ref import joined
from connector.receipt import ReceiptBundle, ReceiptFields, verify_bundle
from connector.result_files import ARROW_SUFFIX, arrow_copy, matches
from connector.safetext import escaped


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the receipt sub-commands."""
    group = commands.add_parser("receipt", help="check receipts kept beside query results")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify",
        help="check a receipt against the provider's certificate and, with --data, the result",
    )
    verify.add_argument("receipt", type=Path, metavar="RECEIPT")
    verify.add_argument(
        "--data",
        type=Path,
        metavar="RESULT",
        help=f"the result as saved by `connector query --output` (any format; for csv, json "
        f"and parquet the Arrow bytes kept beside it as RESULT{ARROW_SUFFIX} are checked too)",
    )
    verify.add_argument(
        "--ca", type=Path, metavar="CA.pem", help="the data space's CA bundle (no home needed)"
    )
    verify.add_argument(
        "--home",
        metavar="HOME",
        help=f"take the CA bundle from this member's home (default: ${HOME_ENV}, else the "
        "current folder) when --ca is not given",
    )
    verify.set_defaults(run=_verify)


def _ca(args: argparse.Namespace) -> bytes:
    path = args.ca if args.ca is not None else settings_of(args).ca
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the CA bundle {path}: {exc.strerror}") from None


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def _verify(args: argparse.Namespace) -> int:
    if is_federated_receipts(args.receipt):
        return _verify_federated(args)
    try:
        bundle = ReceiptBundle.load(args.receipt)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the receipt {args.receipt}: {exc}") from None
    ca = _ca(args)
    try:
        fields = verify_bundle(bundle, ca, None)
        checked = "signature (no --data given)"
        if args.data is not None:
            checked = _check_data(args.data, bundle, fields, ca)
    except JwsError as exc:
        raise PeerError(f"{args.receipt}: NOT VALID: {exc}") from None
    print(
        escaped(
            f"{args.receipt}: valid ({checked}): {fields.rows} rows from {fields.provider_id} "
            f"to {fields.member_id}, request {fields.request_id}, purpose {fields.purpose}, "
            f"policies {joined(fields.policies)}, issued {fields.issued_at}, "
            f"audit entry {fields.audit_seq}"
        )
    )
    return 0


def _check_data(data: Path, bundle: ReceiptBundle, fields: ReceiptFields, ca: bytes) -> str:
    """What was checked of the result file; JwsError when it is not what the receipt signs."""
    content = _read(data, "the result")
    if hashlib.sha256(content).hexdigest() == fields.result_sha256:
        return "signature and data"
    copy = arrow_copy(data)
    if bundle.data_format == "arrow" or not copy.exists():
        raise JwsError(
            "the data does not match the receipt's digest, which covers the Arrow bytes as "
            f"received (saved as RESULT{ARROW_SUFFIX} beside results in other formats)"
        )
    verify_bundle(bundle, ca, _read(copy, "the Arrow copy"))
    table = read_ipc_pieces([copy.read_bytes()])
    if not matches(data, bundle.data_format, table):
        raise JwsError(
            f"{data.name} is not the {bundle.data_format} form of the Arrow bytes the receipt "
            f"signs ({copy.name}): it was changed after it was saved"
        )
    return (
        f"signature, the Arrow bytes in {copy.name}, and {data.name} as their {bundle.data_format}"
    )


def _verify_federated(args: argparse.Namespace) -> int:
    """Every member's receipt of a federated result, and the combined file against them."""
    try:
        parts, silent, checked = verify_receipts(args.receipt, _ca(args), args.data)
    except JwsError as exc:
        raise PeerError(f"{args.receipt}: NOT VALID: {exc}") from None
    for part in parts:
        fields = part.fields
        print(
            escaped(
                f"  {part.member}: {fields.rows} rows from {fields.provider_id}, request "
                f"{fields.request_id}, policies {joined(fields.policies)}"
            )
        )
    for member in silent:
        print(escaped(f"  {member}: no answer, no receipt"))
    print(escaped(f"{args.receipt}: valid ({checked}): {len(parts)} receipts"))
    return 0
