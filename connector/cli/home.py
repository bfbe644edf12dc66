"""`connector init`: lay out a member's home folder."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from connector.cli.common import add_home, add_hosts, hosts_of
from connector.config import (
    CONFIG_FILE,
    DEFAULT_FLIGHT_LISTEN,
    ServerSettings,
    resolve_home,
    settings_from_text,
)
from connector.config_template import render_config
from connector.errors import ConfigError
from connector.identity import (
    CA_CERT_FILE,
    check_member_id,
    dataspace_name_of,
    generate_ed25519_key,
    issue_member_certificate,
    load_certificate,
)
from connector.shaping import load_mask_key
from connector.store import create_database


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the init sub-command."""
    init = commands.add_parser(
        "init",
        help="lay out a member's home: config, certificate, keys, database, policies folder",
    )
    init.add_argument(
        "home_dir", nargs="?", type=Path, metavar="HOME", help="the folder to create (or --home)"
    )
    init.add_argument(
        "--member",
        required=True,
        metavar="MEMBER_ID",
        help="this member's id in the data space (lower-case letters, digits, . _ -)",
    )
    init.add_argument(
        "--dataspace", required=True, type=Path, metavar="DIR", help="folder of the data-space CA"
    )
    init.add_argument(
        "--listen",
        default=ServerSettings.listen,
        metavar="HOST:PORT",
        help="where `connector serve` listens (default: %(default)s)",
    )
    init.add_argument(
        "--flight-listen",
        default=DEFAULT_FLIGHT_LISTEN,
        metavar="HOST:PORT",
        help='where the Arrow Flight SQL port listens (default: %(default)s; "" for none)',
    )
    add_hosts(init)
    init.add_argument("--display-name", help="organisation name shown to peers")
    add_home(init)
    init.set_defaults(run=_init)


def _init(args: argparse.Namespace) -> int:
    home = args.home_dir.resolve() if args.home_dir else resolve_home(args.home)
    member = check_member_id(args.member)
    if (home / CONFIG_FILE).exists():
        raise ConfigError(f"{home / CONFIG_FILE} exists already: this folder is a member's home")
    dataspace = dataspace_name_of(load_certificate(args.dataspace / CA_CERT_FILE))
    hosts = hosts_of(args)
    text = render_config(member, dataspace, args.listen, args.flight_listen)
    settings = settings_from_text(text, home)  # where each file goes, as serve will look
    issue_member_certificate(
        args.dataspace, member, settings.cert.parent, hosts=hosts, display_name=args.display_name
    )
    shutil.copyfile(args.dataspace / CA_CERT_FILE, settings.ca)
    generate_ed25519_key(settings.policy_signing_key)
    generate_ed25519_key(settings.receipt_key)
    load_mask_key(settings.mask_key)  # made here so that it is backed up with the rest
    settings.policies.directory.mkdir(exist_ok=True)
    create_database(settings.database)
    # Written last: a home with connector.toml is complete, and init refuses to redo it.
    (home / CONFIG_FILE).write_text(text, encoding="utf-8")
    print(
        f"member {member} of data space {dataspace}: home {home}\n"
        f"  next: connector ingest --home {home} FILE --dataset NAME\n"
        f"        write a policy in {home / 'policies'}, then\n"
        f"        connector policy sign --home {home} FILE\n"
        f"        connector serve --home {home}"
    )
    return 0
