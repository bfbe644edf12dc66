"""`connector policy sign|verify`: what legal teams run on policy files."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from connector.cli.common import add_home, settings_of
from connector.errors import ConfigError
from connector.identity import load_ed25519_private
from connector.jws import key_id
from connector.policy.signing import (
    VerdictStatus,
    policy_files,
    sign_policy,
    trusted_keys,
    verify_policy,
)
from connector.safetext import escaped
from connector.shaping import Shaping


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the policy sub-commands."""
    group = commands.add_parser("policy", help="sign and verify usage-policy files")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    sign = actions.add_parser(
        "sign", help="write a detached signature (FILE.jws) next to each file"
    )
    add_home(sign)
    sign.add_argument("files", nargs="+", type=Path, metavar="FILE")
    sign.add_argument(
        "--key", type=Path, help="Ed25519 key to sign with (default: [signing] policy_key)"
    )
    sign.set_defaults(run=_sign)

    verify = actions.add_parser("verify", help="say for each policy file: valid, or why not")
    add_home(verify)
    verify.add_argument("files", nargs="*", type=Path, metavar="FILE", help="default: every policy")
    verify.set_defaults(run=_verify)


def _sign(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    key = load_ed25519_private(args.key or settings.policy_signing_key)
    for path in args.files:
        signature = sign_policy(path, key)
        print(escaped(f"{path}: signed by key {key_id(key.public_key())} -> {signature}"))
    return 0


def _verify(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    trusted = trusted_keys(settings.policies.trusted_signers.values())
    files = args.files or policy_files(settings.policies.directory)
    if not files:
        raise ConfigError(f"no policy files (*.yaml) in {settings.policies.directory}")
    now = dt.datetime.now(dt.UTC)
    failed = 0
    for path in files:
        verdict = verify_policy(path, trusted, now)
        ok = verdict.status is VerdictStatus.VALID
        failed += not ok
        print(escaped(f"{path}: {'valid' if ok else 'NOT VALID'}: {verdict.message}"))
        if verdict.policy is not None:
            for line in _shaping_lines(verdict.policy.shaping):
                print(f"  {escaped(line)}")
    return 1 if failed else 0


def _shaping_lines(shaping: Shaping) -> list[str]:
    """What a policy does to its datasets beyond choosing columns, for the legal team."""
    lines = []
    if shaping.masks:
        lines.append("masked: " + ", ".join(f"{c} ({kind})" for c, kind in shaping.masks))
    if shaping.filters:
        lines.append(f"rows: only where {shaping.where_sql()}")
    if shaping.min_group_size:
        lines.append(
            f"aggregate-only: groups of at least {shaping.min_group_size} rows, no raw rows"
        )
    return lines
