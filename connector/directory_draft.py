"""The data-space authority's side of the member directory: the draft kept beside the CA
(DIR/members.json), edited by `dataspace member add|remove`, and `dataspace publish`, which
signs it with the CA key as the next version (FILE and the detached FILE.jws)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from connector import jws
from connector.atomic_file import write_atomically
from connector.directory import (
    COUNTRY,
    DRAFT_FILE,
    Directory,
    MemberEntry,
    check_endpoint,
    check_role,
    parse_entry,
    signature_path,
)
from connector.errors import DirectoryError, IdentityError
from connector.identity import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    check_member_id,
    dataspace_name_of,
    load_certificate,
    load_private_key,
)


@dataclass(frozen=True)
class Draft:
    """The authority's working list and the last version it published."""

    members: tuple[MemberEntry, ...] = ()
    published_version: int = 0


def _draft_path(folder: Path) -> Path:
    return folder / DRAFT_FILE


def read_draft(folder: Path) -> Draft:
    """The draft in folder (empty when none was written yet)."""
    path = _draft_path(folder)
    if not (folder / CA_CERT_FILE).exists():
        raise DirectoryError(
            f"{folder} holds no data-space CA ({CA_CERT_FILE}); the directory is kept beside "
            "the CA made by `connector dataspace init`"
        )
    if not path.exists():
        return Draft()
    try:
        raw = jws.parse_json(path.read_bytes())
        members = raw["members"]
        published = raw["published_version"]
        if not isinstance(members, list) or not isinstance(published, int):
            raise TypeError
        return Draft(tuple(parse_entry(m, i) for i, m in enumerate(members)), published)
    except (OSError, jws.JwsError, KeyError, TypeError) as exc:
        raise DirectoryError(f"{path} is not a member-directory draft ({exc})") from None


def _write_draft(folder: Path, draft: Draft) -> None:
    document = {
        "members": [m.as_json() for m in sorted(draft.members, key=lambda m: m.id)],
        "published_version": draft.published_version,
    }
    write_atomically(_draft_path(folder), (json.dumps(document, indent=2) + "\n").encode())


def add_member(folder: Path, entry: MemberEntry) -> bool:
    """Put entry in the draft (replacing one with its id); True when it replaced one."""
    try:
        check_member_id(entry.id)
    except IdentityError as exc:
        raise DirectoryError(str(exc)) from None
    for endpoint in entry.endpoints:
        check_endpoint(endpoint)
    for role in entry.roles:
        check_role(role)
    if entry.country and not COUNTRY.fullmatch(entry.country):
        raise DirectoryError(f"invalid country {entry.country!r}: use a two-letter code (DE)")
    draft = read_draft(folder)
    others = tuple(m for m in draft.members if m.id != entry.id)
    _write_draft(folder, replace(draft, members=(*others, entry)))
    return len(others) != len(draft.members)


def remove_member(folder: Path, member_id: str) -> None:
    """Take member_id out of the draft; DirectoryError when it is not there."""
    draft = read_draft(folder)
    others = tuple(m for m in draft.members if m.id != member_id)
    if len(others) == len(draft.members):
        raise DirectoryError(f"{member_id} is not in the directory draft in {folder}")
    _write_draft(folder, replace(draft, members=others))


def publish(folder: Path, out: Path) -> Directory:
    """Sign the draft with the CA key in folder as the next version; write out and out.jws."""
    draft = read_draft(folder)
    ca_key = load_private_key(folder / CA_KEY_FILE)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise DirectoryError(f"{folder / CA_KEY_FILE}: the CA key must be EC P-256")
    directory = Directory(
        dataspace_name_of(load_certificate(folder / CA_CERT_FILE)),
        draft.published_version + 1,
        dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        tuple(sorted(draft.members, key=lambda m: m.id)),
    )
    data = directory.to_json()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(out, data)
    write_atomically(
        signature_path(out), (jws.sign_es256(data, ca_key, detached=True) + "\n").encode()
    )
    # Recorded last: a failed write above leaves the version free to publish again.
    _write_draft(folder, replace(draft, published_version=directory.version))
    return directory
