"""`connector policy sign|publish|verify`: what legal teams run on policy files."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import sys
from collections.abc import Mapping
from pathlib import Path

from connector.cli import policy_authoring, policy_cases, policy_replay, policy_review
from connector.cli.common import add_home, datasets_or_note, settings_of
from connector.config import Settings
from connector.errors import ConfigError
from connector.identity import load_ed25519_private
from connector.jws import key_id
from connector.policy.consistency import mask_conflicts
from connector.policy.explain import nested_grouping_warnings
from connector.policy.fit import fit_warnings
from connector.policy.model import MAX_POLICY_BYTES, parse_policy, read_limited
from connector.policy.publish import Published, publish_policy
from connector.policy.signing import (
    PolicyVerdict,
    VerdictStatus,
    against_memory,
    load_policy_dir,
    memory_refusal,
    sign_policy,
    trusted_keys,
    verify_policy,
)
from connector.policy.versions import VersionMemory, VersionRecord
from connector.safetext import escaped
from connector.shaping import Shaping


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the policy sub-commands."""
    group = commands.add_parser("policy", help="sign, publish and verify usage-policy files")
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    sign = actions.add_parser(
        "sign", help="write a detached signature (FILE.jws) next to each file"
    )
    add_home(sign)
    sign.add_argument("files", nargs="+", type=Path, metavar="FILE", help="policy files (.yaml)")
    _add_key(sign)
    sign.set_defaults(run=_sign)

    publish = actions.add_parser(
        "publish",
        help="sign a draft kept outside the policies folder and move it in with its signature; "
        "older versions of the same policy are retired once it is in force",
    )
    add_home(publish)
    publish.add_argument(
        "draft", type=Path, metavar="DRAFT", help="the policy file, kept outside policies/"
    )
    _add_key(publish)
    publish.set_defaults(run=_publish)

    verify = actions.add_parser("verify", help="say for each policy file: valid, or why not")
    add_home(verify)
    verify.add_argument("files", nargs="*", type=Path, metavar="FILE", help="default: every policy")
    verify.set_defaults(run=_verify)
    policy_authoring.add_to(actions)
    policy_review.add_to(actions)
    policy_cases.add_to(actions)
    policy_replay.add_to(actions)


def _add_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key", type=Path, help="Ed25519 key to sign with (default: [signing] policy_key)"
    )


def _remembered(settings: Settings) -> Mapping[str, VersionRecord]:
    """The versions the server has recorded in force (the same file it reads)."""
    return VersionMemory(settings.policies.versions_file).records


def _sign(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    key = load_ed25519_private(args.key or settings.policy_signing_key)
    remembered = _remembered(settings)
    for path in args.files:
        signature = sign_policy(path, key)
        print(escaped(f"{path}: signed by key {key_id(key.public_key())} -> {signature}"))
        data = read_limited(path, MAX_POLICY_BYTES)
        refusal = memory_refusal(
            parse_policy(path, data), hashlib.sha256(data).hexdigest(), remembered
        )
        if refusal is not None:
            print(
                escaped(f"{path}: warning: this connector will not put it in force: {refusal[1]}"),
                file=sys.stderr,
            )
    return 0


def _publish(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    key = load_ed25519_private(args.key or settings.policy_signing_key)
    published = publish_policy(
        args.draft,
        settings.policies.directory,
        key,
        trusted=trusted_keys(settings.policies.trusted_signers.values()),
        remembered=_remembered(settings),
        now=dt.datetime.now(dt.UTC),
    )
    for line in _published_lines(published, key_id(key.public_key())):
        print(line)
    return 0


def _published_lines(published: Published, kid: str) -> list[str]:
    policy = published.policy
    name = f"{policy.id} version {policy.version}"
    if published.already_published:
        return [f"{name} is already published as {published.path}; nothing changed"]
    lines = [f"published {name} as {published.path} (signed by key {kid})"]
    if published.in_force_now:
        lines.append("in force from the connector's next reload (within [policies] reload_seconds)")
        lines += [f"older version moved to {path}" for path in published.retired]
        return lines
    start = policy.valid_from.isoformat()
    if published.kept:
        lines += [
            f"valid only from {start}; until then {v.path.name} (version "
            f"{v.policy.version if v.policy else '?'}) stays in force"
            for v in published.kept
        ]
    else:
        lines.append(f"valid only from {start}; until then no version of {policy.id} is in force")
    return lines


def _verify(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    trusted = trusted_keys(settings.policies.trusted_signers.values())
    remembered = _remembered(settings)
    now = dt.datetime.now(dt.UTC)
    # The folder as the server judges it: duplicates, superseded and rolled-back versions.
    _, folder = load_policy_dir(settings.policies.directory, trusted, now, remembered)
    if not args.files and not folder:
        raise ConfigError(f"no policy files (*.yaml) in {settings.policies.directory}")
    verdicts: list[PolicyVerdict] = folder
    if args.files:
        by_path = {v.path.resolve(): v for v in folder}
        verdicts = [
            by_path.get(path.resolve())
            or against_memory(verify_policy(path, trusted, now), remembered)
            for path in args.files
        ]
    failed = 0
    for verdict in verdicts:
        ok = verdict.status is VerdictStatus.VALID
        failed += not ok
        print(escaped(f"{verdict.path}: {'valid' if ok else 'NOT VALID'}: {verdict.message}"))
        if verdict.policy is not None:
            for line in _shaping_lines(verdict.policy.shaping):
                print(f"  {escaped(line)}")
    datasets = datasets_or_note(settings)
    for verdict in verdicts:
        if verdict.status is VerdictStatus.VALID and verdict.policy and datasets is not None:
            for warning in fit_warnings(verdict.policy, datasets):
                print(escaped(f"{verdict.path}: WARNING: {warning}"))
    # Judged over the folder, as the server would put it in force.
    in_force = [v.policy for v in folder if v.status is VerdictStatus.VALID and v.policy]
    for conflict in mask_conflicts(in_force):
        print(escaped(f"WARNING: {conflict.describe()}"))
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
