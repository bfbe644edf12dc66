"""`connector ingest` and `connector datasets`: the member's own data."""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from connector.cli.common import add_home, settings_of
from connector.config import Settings
from connector.errors import ConfigError, DataError
from connector.ingest_client import home_datasets, home_versions, submit
from connector.safetext import escaped
from connector.signal_inbox import SignalInbox
from connector.store_ingest import LoadRequest, check_dataset_name
from connector.watch import DropFolder


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ingest and datasets sub-commands."""
    load = commands.add_parser(
        "ingest",
        help="load a CSV, Parquet or JSON file as a dataset (also while the server runs), or "
        "watch a folder for such files",
    )
    add_home(load)
    load.add_argument(
        "file", type=Path, nargs="?", metavar="FILE", help="a .csv, .parquet or .json file"
    )
    load.add_argument(
        "--watch",
        type=Path,
        metavar="DIR",
        help="instead of FILE: load each new file that appears in DIR, once, until SIGTERM; "
        "loaded files move to DIR/done/, refused ones to DIR/failed/ beside NAME.reason",
    )
    load.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="with --watch: how often DIR is scanned; a file is taken once it has not changed "
        "for this long (default: %(default)s)",
    )
    load.add_argument(
        "--once",
        action="store_true",
        help="with --watch: load the files in DIR now, then exit",
    )
    load.add_argument(
        "--dataset",
        required=True,
        metavar="NAME",
        help="the dataset to load it into (lower-case letters, digits and _)",
    )
    load.add_argument(
        "--description", metavar="TEXT", help="shown to peers in their catalog (kept if omitted)"
    )
    mode = load.add_mutually_exclusive_group()
    mode.add_argument(
        "--replace",
        dest="mode",
        action="store_const",
        const="replace",
        help="replace the dataset's rows (the default)",
    )
    mode.add_argument(
        "--append",
        dest="mode",
        action="store_const",
        const="append",
        help="add the rows to the dataset (the columns must match)",
    )
    load.add_argument("--format", choices=("csv", "parquet", "json"), help="default: by suffix")
    load.add_argument(
        "--normalise-names",
        action="store_true",
        help="load headers that are not plain SQL names (plant name, Größe) as plain names "
        "(plant_name, grosse); without it such a file is refused with the names it would get",
    )
    load.add_argument(
        "--csv-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the CSV dialect when it is not detected: delimiter (, ; tab |), quote, escape, "
        "encoding (default utf-8); repeat for several",
    )
    load.set_defaults(run=_ingest, mode="replace")

    show = commands.add_parser("datasets", help="list the datasets in this member's database")
    add_home(show)
    show.add_argument(
        "--versions",
        metavar="NAME",
        help="list every version of dataset NAME instead: mode, rows, file and its sha256 "
        "(the manifest a watched folder loads each file once by)",
    )
    show.set_defaults(run=_datasets)


def _ingest(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    if (args.file is None) == (args.watch is None):
        raise ConfigError("give either FILE or --watch DIR")
    check_dataset_name(args.dataset)
    request = LoadRequest(
        source=args.file or Path(),
        dataset=args.dataset,
        mode=args.mode,
        description=args.description,
        file_format=args.format,
        csv_options=_csv_options(args.csv_option),
        normalise_names=args.normalise_names,
    )
    if args.watch is not None:
        return _watch(settings, args.watch, request, args.interval, once=args.once)
    info = submit(settings, request)
    verb = "replaced with" if args.mode == "replace" else "appended to, now"
    columns = ", ".join(f"{c.name} {c.type}" for c in info.columns)
    print(
        escaped(f"dataset {info.name} {verb} {info.rows} rows (version {info.version}): {columns}")
    )
    return 0


def _watch(
    settings: Settings, folder: Path, template: LoadRequest, interval: float, *, once: bool
) -> int:
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; --watch needs the drop folder")
    if not 0.05 <= interval <= 3600:
        raise ConfigError("--interval must be from 0.05 to 3600 seconds")
    drops = DropFolder(folder, template, lambda request: submit(settings, request))
    if once:
        outcomes = drops.scan(settled=True)
        for outcome in outcomes:
            print(escaped(f"{outcome.name}: {outcome.result} {outcome.detail}".rstrip()))
        return 1 if any(o.result == "failed" for o in outcomes) else 0
    with SignalInbox((signal.SIGTERM, signal.SIGINT)) as inbox:
        drops.run(lambda seconds: _stop_received(inbox, seconds), interval)
    return 0


def _stop_received(inbox: SignalInbox, seconds: float) -> bool:
    for number in inbox.wait(seconds):
        logging.getLogger(__name__).info("%s received, stopping", number.name)
        return True
    return False


def _csv_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"--csv-option {pair!r} must look like KEY=VALUE, e.g. delimiter=;")
        options[key.strip()] = value
    return options


def _datasets(args: argparse.Namespace) -> int:
    if args.versions is not None:
        return _versions(settings_of(args), args.versions)
    for info in home_datasets(settings_of(args)):
        print(
            escaped(
                f"{info.name}  {info.rows} rows  {len(info.columns)} columns  "
                f"{info.description}  (version {info.version})"
            )
        )
    return 0


def _versions(settings: Settings, dataset: str) -> int:
    versions = home_versions(settings, dataset)
    if not versions:
        raise DataError(f"no versions of dataset {dataset!r} are recorded in this home")
    for v in versions:
        print(
            escaped(
                f"{v.version}  {v.ingested_at:%Y-%m-%d %H:%M:%S}  {v.mode}  "
                f"rows {v.rows_before}->{v.rows_after}  {v.source}  {v.sha256 or '-'}"
            )
        )
    return 0
