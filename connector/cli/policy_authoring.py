"""`connector policy new|lint`: draft a policy and find its mistakes before it is signed."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from connector.cli.common import add_home, settings_of
from connector.config import Settings
from connector.errors import ConfigError, ConnectorError, PolicyError
from connector.held_directory import load_held
from connector.ingest_client import home_datasets
from connector.policy.draft import DraftTerms, check_terms, draft_text
from connector.policy.lint import lint_files
from connector.policy.lint_draft import Finding, HomeFacts, Severity
from connector.policy.signing import (
    VerdictStatus,
    load_policy_dir,
    policy_files,
    trusted_keys,
)
from connector.policy.versions import VersionMemory
from connector.safetext import escaped
from connector.shaping import MASK_KINDS
from connector.store import DatasetInfo

# Verdicts whose file carries a good signature: a version signed before.
_SIGNED = {
    VerdictStatus.VALID,
    VerdictStatus.EXPIRED,
    VerdictStatus.NOT_YET_VALID,
    VerdictStatus.DUPLICATE,
    VerdictStatus.SUPERSEDED,
    VerdictStatus.ROLLED_BACK,
    VerdictStatus.VERSION_REUSED,
}
_COMING = {VerdictStatus.VALID, VerdictStatus.NOT_YET_VALID}


def add_to(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `policy new` and `policy lint`."""
    new = actions.add_parser(
        "new",
        help="write a commented policy file from flags, or by asking on a terminal",
    )
    add_home(new)
    new.add_argument("--id", dest="policy_id", help="the policy id, like supplier-quality")
    new.add_argument("--description", help="what is shared, with whom and why")
    new.add_argument("--dataset", action="append", default=[], help="a dataset (repeatable)")
    new.add_argument("--member", action="append", default=[], help="a grantee (repeatable)")
    new.add_argument("--purpose", action="append", default=[], help="a purpose (repeatable)")
    new.add_argument("--from", dest="valid_from", help="first day, YYYY-MM-DD (default: today)")
    new.add_argument("--until", dest="valid_until", help="end day, YYYY-MM-DD")
    new.add_argument("--column", action="append", default=[], help="a column shown (repeatable)")
    new.add_argument(
        "--mask",
        action="append",
        default=[],
        metavar="COLUMN=KIND",
        help=f"a column shown masked, KIND one of {', '.join(MASK_KINDS)} (repeatable)",
    )
    new.add_argument("--output", "-o", type=Path, help="the file to write (default: ID.yaml here)")
    new.add_argument("--force", action="store_true", help="overwrite the output file")
    new.set_defaults(run=_new)

    lint = actions.add_parser(
        "lint", help="find mistakes in policy files, each with file, line and a fix"
    )
    add_home(lint)
    lint.add_argument(
        "files", nargs="*", type=Path, metavar="FILE", help="default: every policy of the home"
    )
    lint.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    lint.set_defaults(run=_lint)


def home_facts(settings: Settings, now: dt.datetime) -> tuple[HomeFacts, list[str]]:
    """What lint checks drafts against, and notes on what could not be read."""
    notes = []
    datasets: dict[str, DatasetInfo] | None
    try:
        datasets = {info.name: info for info in home_datasets(settings)}
    except ConnectorError as error:
        datasets = None
        notes.append(f"datasets and columns not checked: {error}")
    remembered = VersionMemory(settings.policies.versions_file).records
    trusted = trusted_keys(settings.policies.trusted_signers.values())
    _, verdicts = load_policy_dir(settings.policies.directory, trusted, now, remembered)
    facts = HomeFacts(
        datasets=datasets,
        signed=[v.policy for v in verdicts if v.policy and v.status in _SIGNED],
        in_force=[v.policy for v in verdicts if v.policy and v.status in _COMING],
        remembered=remembered,
        own_member=settings.member_id,
        revoked_members=settings.revoked.members,
        mask_consistency=settings.policies.mask_consistency,
        now=now,
    )
    directory = None
    try:
        directory = load_held(settings.home, settings.ca.read_bytes(), settings.dataspace)
        if directory is None:
            notes.append(
                "grantees not checked against the data space's members: this home holds no "
                "member directory (`connector directory update`)"
            )
    except (OSError, ConnectorError) as error:
        notes.append(f"grantees not checked against the data space's members: {error}")
    return dataclasses.replace(facts, directory=directory), notes


def _lint(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    files = list(args.files) or policy_files(settings.policies.directory)
    if not files:
        raise ConfigError(f"no policy files (*.yaml) in {settings.policies.directory}")
    facts, notes = home_facts(settings, dt.datetime.now(dt.UTC))
    for note in notes:
        print(escaped(f"note: {note}"), file=sys.stderr)
    findings = lint_files(files, facts)
    return _report(findings, len(files), strict=args.strict)


def _report(findings: Sequence[Finding], file_count: int, *, strict: bool) -> int:
    for finding in findings:
        for line in finding.render().splitlines():
            print(escaped(line))
    errors = sum(f.severity is Severity.ERROR for f in findings)
    warnings = len(findings) - errors
    print(f"{errors} error(s), {warnings} warning(s) in {file_count} file(s)")
    return 1 if errors or (strict and warnings) else 0


def _new(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    try:
        datasets = {info.name: info for info in home_datasets(settings)}
    except ConnectorError as error:
        raise ConfigError(
            f"cannot read this home's datasets ({error}); a policy is drafted against them"
        ) from None
    ask = _asker() if sys.stdin.isatty() else None
    terms = _terms(args, datasets, ask)
    check_terms(terms)
    output: Path = args.output or Path(f"{terms.policy_id}.yaml")
    if output.exists() and not args.force:
        raise ConfigError(f"{output} exists already: choose another --output, or --force")
    output.write_text(draft_text(terms), encoding="utf-8")
    print(escaped(f"wrote {output}"))
    facts, _ = home_facts(settings, dt.datetime.now(dt.UTC))
    status = _report(lint_files([output], facts), 1, strict=False)
    if status == 0:
        home = settings.home
        print(
            escaped(
                f"next: connector policy explain --home {home} {output}\n"
                f"      connector policy test --home {home} --policies DRAFTS CASES.yaml\n"
                f"      connector policy publish --home {home} {output}"
            )
        )
    return status


Ask = Callable[[str], str]


def _asker() -> Ask:
    def ask(prompt: str) -> str:
        try:
            return input(prompt).strip()
        except EOFError:
            raise ConfigError("no answer given: pass the value as a flag instead") from None

    return ask


def _terms(
    args: argparse.Namespace, datasets: dict[str, DatasetInfo], ask: Ask | None
) -> DraftTerms:
    """The answers from the flags, asking on the terminal for any that are missing."""

    def need(value: list[str] | str | None, flag: str, prompt: str) -> list[str]:
        if value:
            return value if isinstance(value, list) else [value]
        if ask is None:
            raise ConfigError(f"{flag} is missing: pass it, or run on a terminal to be asked")
        return [p.strip() for p in ask(prompt).split(",") if p.strip()]

    if ask is not None and not args.dataset:
        print("datasets of this home: " + (", ".join(sorted(datasets)) or "none yet"))
    chosen = need(args.dataset, "--dataset", "dataset(s), comma-separated: ")
    unknown = [d for d in chosen if d not in datasets]
    if unknown:
        raise ConfigError(
            f"dataset {unknown[0]} is not in this home's data; choose from: "
            + (", ".join(sorted(datasets)) or "none: ingest one first (`connector ingest`)")
        )
    if ask is not None and not args.column:
        for name in chosen:
            print(f"columns of {name}:")
            for column in datasets[name].columns:
                print(f"  {column.name}  {column.type}")
    today = dt.datetime.now(dt.UTC).date()
    start = _date(args.valid_from or (ask and ask(f"valid from [{today}]: ")) or str(today))
    default_end = str(start.replace(year=start.year + 1))
    end_text = args.valid_until or (ask and ask(f"valid until [{default_end}]: "))
    if not end_text and ask is None:
        raise ConfigError("--until is missing: pass the end date the contract names")
    policy_id = need(args.policy_id, "--id", "policy id (like supplier-quality): ")[0]
    members = need(args.member, "--member", "grantee member id(s), comma-separated: ")
    purposes = need(args.purpose, "--purpose", "purpose(s), comma-separated: ")
    columns = need(args.column, "--column", "columns shown in the clear, comma-separated: ")
    masks = args.mask or (
        [m for m in (ask("masked columns as COLUMN=KIND, comma-separated [none]: ").split(","))]
        if ask
        else []
    )
    description = (
        args.description
        or (ask and ask("description (what, with whom, why): "))
        or f"{', '.join(chosen)} for {', '.join(members)}: {', '.join(purposes)}"
    )
    return DraftTerms(
        policy_id=policy_id,
        description=description,
        datasets=tuple(chosen),
        members=tuple(members),
        purposes=tuple(purposes),
        valid_from=start,
        valid_until=_date(end_text or default_end),
        columns=tuple(c.lower() for c in columns),
        masks=_masks(masks),
    )


def _masks(entries: Sequence[str]) -> dict[str, str]:
    masks = {}
    for entry in (e.strip() for e in entries):
        if not entry:
            continue
        column, sep, kind = entry.partition("=")
        if not sep:
            raise PolicyError(f"mask {entry!r} needs COLUMN=KIND, like supplier=hash")
        masks[column.strip().lower()] = kind.strip()
    return masks


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a date: write it as 2026-01-31") from None
