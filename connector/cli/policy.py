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
        print(f"{path}: signed by key {key_id(key.public_key())} -> {signature}")
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
        print(f"{path}: {'valid' if ok else 'NOT VALID'}: {verdict.message}")
        if verdict.policy is not None:
            for line in _shaping_lines(verdict.policy.shaping):
                print(f"  {line}")
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
    if shaping.noise is not None:
        lines.append(shaping.noise.describe())
    if shaping.group_by:
        lines.append("group by only: " + "; ".join(", ".join(g) for g in shaping.group_by))
    lines += [f"WARNING: {warning}" for warning in nested_grouping_warnings(shaping)]
    return lines


def nested_grouping_warnings(shaping: Shaping) -> list[str]:
    """Warnings for declared grouping sets that can be differenced (only without noise): a
    set inside another always can; any two sets can through the columns they share."""
    if shaping.noise is not None:
        return []
    warnings = []
    sets = shaping.group_by
    for i, first in enumerate(sets):
        for second in sets[i + 1 :]:
            coarse, fine = (first, second) if len(first) <= len(second) else (second, first)
            if set(coarse) < set(fine):
                warnings.append(
                    f"grouping sets ({', '.join(coarse)}) and ({', '.join(fine)}) nest: without "
                    f"noise, the ({', '.join(coarse)}) answer minus the ({', '.join(fine)}) "
                    "answer gives back the groups under min_group_size that the finer query "
                    "drops (differencing); declare one set, or add noise"
                )
                continue
            common = ", ".join(c for c in first if c in second) or "the grand total"
            warnings.append(
                f"grouping sets ({', '.join(first)}) and ({', '.join(second)}) both add up to "
                f"({common}): when one of them drops no group, the other's dropped small groups "
                "can be recovered by subtraction; declare one set, or add noise"
            )
    return warnings
