"""`connector ingest` and `connector datasets`: the member's own data."""

from __future__ import annotations

import argparse
from pathlib import Path

from connector.cli.common import add_home, settings_of
from connector.errors import DataError
from connector.safetext import escaped
from connector.store import ingest, list_datasets


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ingest and datasets sub-commands."""
    load = commands.add_parser("ingest", help="load a CSV, Parquet or JSON file as a dataset")
    add_home(load)
    load.add_argument("file", type=Path, metavar="FILE", help="a .csv, .parquet or .json file")
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
    show.set_defaults(run=_datasets)


def _ingest(args: argparse.Namespace) -> int:
    settings = settings_of(args)
    info = ingest(
        settings.database,
        args.file,
        args.dataset,
        description=args.description,
        mode=args.mode,
        file_format=args.format,
        csv_options=_csv_options(args.csv_option),
        normalise_names=args.normalise_names,
    )
    verb = "replaced with" if args.mode == "replace" else "appended to, now"
    columns = ", ".join(f"{c.name} {c.type}" for c in info.columns)
    print(escaped(f"dataset {info.name} {verb} {info.rows} rows: {columns}"))
    return 0


def _csv_options(pairs: list[str]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DataError(f"--csv-option {pair!r} must look like KEY=VALUE, e.g. delimiter=;")
        options[key.strip()] = value
    return options


def _datasets(args: argparse.Namespace) -> int:
    for info in list_datasets(settings_of(args).database):
        print(
            escaped(
                f"{info.name}  {info.rows} rows  {len(info.columns)} columns  {info.description}"
            )
        )
    return 0
