"""Reading and validating connector.toml into one frozen settings object.

Paths in the file are relative to the member's home folder. Unknown sections and keys are
errors: a typo in a security setting must not be silently ignored.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connector.errors import ConfigError
from connector.process_memory import AUTO, MIN_OVERHEAD, parse_size

CONFIG_FILE = "connector.toml"
CONFIG_FORMAT = 1
HOME_ENV = "CONNECTOR_HOME"
ENGINES = ("embedded", "opa")
_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$", re.IGNORECASE)


@dataclass(frozen=True)
class ServerSettings:
    """How the gRPC server listens and bounds each query."""

    listen: str = "127.0.0.1:50051"
    max_query_seconds: float = 30.0
    memory_limit: str = "1GB"
    process_memory_limit: str = AUTO
    threads: int = 2
    batch_rows: int = 65_536
    max_concurrent_queries: int = 8
    max_message_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class PolicySettings:
    """Where policies live, who may sign them and which engine decides."""

    directory: Path
    trusted_signers: Mapping[str, Path]
    engine: str = "embedded"
    opa_url: str = ""
    reload_seconds: float = 2.0


@dataclass(frozen=True)
class Revocations:
    """Members and certificate serials refused even though their certificate chains."""

    members: frozenset[str] = frozenset()
    serials: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Settings:
    """Everything connector.toml says, with paths resolved against the home folder."""

    home: Path
    member_id: str
    dataspace: str
    cert: Path
    key: Path
    ca: Path
    database: Path
    policy_signing_key: Path
    receipt_key: Path
    mask_key: Path
    audit_log: Path
    quota_ledger: Path
    shaped_copies: Path
    server: ServerSettings
    policies: PolicySettings
    revoked: Revocations = field(default_factory=Revocations)


def resolve_home(home: str | os.PathLike[str] | None) -> Path:
    """The home folder: the given one, else $CONNECTOR_HOME, else the current folder."""
    if home is not None:
        return Path(home).expanduser().resolve()
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser().resolve() if env else Path.cwd()


def load_settings(home: Path) -> Settings:
    """Read HOME/connector.toml; ConfigError names the file, the key and what is expected."""
    path = home / CONFIG_FILE
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found: run `connector init {home} --member ID --dataspace DIR` first, "
            f"or pass --home (or set ${HOME_ENV}) to a member's home folder"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return _settings_from(raw, home, path)


class _Section:
    """One TOML table being read; remembers which keys were used to reject the rest."""

    def __init__(self, raw: Any, name: str, path: Path) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: [{name}] must be a table")
        self.raw: dict[str, Any] = raw
        self.name = name
        self.path = path
        self.used: set[str] = set()

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.raw:
            if default is _REQUIRED:
                raise ConfigError(f"{self.path}: [{self.name}] needs '{key}'")
            return default
        value = self.raw[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise ConfigError(f"{self.path}: [{self.name}] {key} must not be true/false")
        if not isinstance(value, kind):
            raise ConfigError(f"{self.path}: [{self.name}] {key} has the wrong type ({value!r})")
        return value

    def text(self, key: str, default: Any = None) -> str:
        return str(self._get(key, str, _REQUIRED if default is None else default))

    def number(self, key: str, default: float, minimum: float) -> float:
        value = float(self._get(key, (int, float), default))
        if value < minimum:
            raise ConfigError(f"{self.path}: [{self.name}] {key} must be at least {minimum}")
        return value

    def whole(self, key: str, default: int, minimum: int) -> int:
        value = int(self._get(key, int, default))
        if value < minimum:
            raise ConfigError(f"{self.path}: [{self.name}] {key} must be at least {minimum}")
        return value

    def strings(self, key: str) -> list[str]:
        values = self._get(key, list, [])
        if not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{self.path}: [{self.name}] {key} must be a list of strings")
        return list(values)

    def table(self, key: str) -> dict[str, Any]:
        return dict(self._get(key, dict, {}))

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            raise ConfigError(
                f"{self.path}: unknown key(s) in [{self.name}]: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(self.used))}"
            )


_REQUIRED = object()


def _settings_from(raw: dict[str, Any], home: Path, path: Path) -> Settings:
    top = _Section(raw, "top level", path)
    fmt = top.whole("format", CONFIG_FORMAT, 1)
    if fmt > CONFIG_FORMAT:
        raise ConfigError(
            f"{path} has format {fmt}, written for a newer connector (this one reads "
            f"format {CONFIG_FORMAT}); upgrade the connector"
        )
    sections = {name: _Section(top.table(name), name, path) for name in _SECTIONS}
    top.finish()
    member, tls = sections["member"], sections["tls"]
    settings = Settings(
        home=home,
        member_id=member.text("id"),
        dataspace=member.text("dataspace"),
        cert=home / tls.text("cert", "tls/cert.pem"),
        key=home / tls.text("key", "tls/key.pem"),
        ca=home / tls.text("ca", "tls/ca.pem"),
        database=home / sections["store"].text("path", "data.duckdb"),
        policy_signing_key=home / sections["signing"].text("policy_key", "keys/policy-signing.key"),
        receipt_key=home / sections["signing"].text("receipt_key", "keys/receipt.key"),
        mask_key=home / sections["signing"].text("mask_key", "keys/mask.key"),
        audit_log=home / sections["audit"].text("path", "audit/audit.jsonl"),
        quota_ledger=home / sections["store"].text("quota_ledger", "state/quota.sqlite"),
        shaped_copies=home / sections["store"].text("shaped_copies", "state/shaped.duckdb"),
        server=_server(sections["server"]),
        policies=_policies(sections["policies"], home),
        revoked=_revoked(sections["revoked"]),
    )
    for section in sections.values():
        section.finish()
    return settings


_SECTIONS = ("member", "server", "tls", "store", "policies", "signing", "audit", "revoked")


def _server(section: _Section) -> ServerSettings:
    memory = section.text("memory_limit", ServerSettings.memory_limit)
    if not _SIZE.fullmatch(memory.strip()):
        raise ConfigError(
            f"{section.path}: [server] memory_limit {memory!r} is not a size like '1GB' or '512MiB'"
        )
    return ServerSettings(
        listen=section.text("listen", ServerSettings.listen),
        max_query_seconds=section.number(
            "max_query_seconds", ServerSettings.max_query_seconds, 0.1
        ),
        memory_limit=memory,
        process_memory_limit=_process_memory(section, memory),
        threads=section.whole("threads", ServerSettings.threads, 1),
        batch_rows=section.whole("batch_rows", ServerSettings.batch_rows, 1),
        max_concurrent_queries=section.whole(
            "max_concurrent_queries", ServerSettings.max_concurrent_queries, 1
        ),
        max_message_bytes=section.whole(
            "max_message_bytes", ServerSettings.max_message_bytes, 1024
        ),
    )


def _process_memory(section: _Section, memory_limit: str) -> str:
    value = section.text("process_memory_limit", AUTO)
    if value.strip().lower() == AUTO:
        return AUTO
    size, least = parse_size(value), (parse_size(memory_limit) or 0) + MIN_OVERHEAD
    if size is None or size < least:
        raise ConfigError(
            f'{section.path}: [server] process_memory_limit {value!r} must be "auto" or a '
            f"size like '2GiB' of at least memory_limit + 256MiB ({least >> 20} MiB)"
        )
    return value


def _policies(section: _Section, home: Path) -> PolicySettings:
    engine = section.text("engine", "embedded")
    if engine not in ENGINES:
        raise ConfigError(
            f"{section.path}: [policies] engine must be one of {', '.join(ENGINES)}, not {engine!r}"
        )
    opa_url = section.text("opa_url", "")
    if engine == "opa" and not opa_url:
        raise ConfigError(f"{section.path}: [policies] engine = 'opa' needs opa_url")
    signers = section.table("trusted_signers")
    if not all(isinstance(v, str) for v in signers.values()):
        raise ConfigError(
            f"{section.path}: [policies.trusted_signers] maps a signer name to a public key file"
        )
    return PolicySettings(
        directory=home / section.text("dir", "policies"),
        trusted_signers={name: home / str(file) for name, file in signers.items()},
        engine=engine,
        opa_url=opa_url,
        reload_seconds=section.number("reload_seconds", 2.0, 0.1),
    )


def _revoked(section: _Section) -> Revocations:
    serials: set[int] = set()
    for text in section.strings("serials"):
        try:
            serials.add(int(text.replace(":", ""), 16))
        except ValueError:
            raise ConfigError(
                f"{section.path}: [revoked] serials holds {text!r}, not a hexadecimal serial"
            ) from None
    return Revocations(members=frozenset(section.strings("members")), serials=frozenset(serials))


def render_config(member_id: str, dataspace: str, listen: str) -> str:
    """The connector.toml that `connector init` writes, with every setting explained."""
    return f"""\
# connector.toml: settings of one member's connector. Paths are relative to this folder.
format = {CONFIG_FORMAT}

[member]
id = "{member_id}"
dataspace = "{dataspace}"

[server]
listen = "{listen}"
max_query_seconds = 30      # a query running longer is interrupted (DEADLINE_EXCEEDED)
memory_limit = "1GB"        # DuckDB memory for all queries together
process_memory_limit = "auto"  # memory `connector serve` may add to what it maps at start;
                            # "auto" is memory_limit + 512MiB. DuckDB does not count strings
                            # a query builds: past this limit that query ends with
                            # RESOURCE_EXHAUSTED and the server goes on (Linux)
threads = 2                 # DuckDB threads
batch_rows = 65536          # rows per Arrow record batch sent to the peer
max_concurrent_queries = 8  # more at once are refused with RESOURCE_EXHAUSTED

[tls]
cert = "tls/cert.pem"
key = "tls/key.pem"
ca = "tls/ca.pem"           # the data space's CA bundle: peers must chain to it

[store]
path = "data.duckdb"
quota_ledger = "state/quota.sqlite"   # daily query and row counts per member and policy
shaped_copies = "state/shaped.duckdb" # masked / filtered copies of datasets, remade at start

[policies]
dir = "policies"
engine = "embedded"         # or "opa" with opa_url = "http://127.0.0.1:8181"
reload_seconds = 2

[policies.trusted_signers]  # name = Ed25519 public key (PEM) whose policy signatures count
legal = "keys/policy-signing.key.pub"

[signing]
policy_key = "keys/policy-signing.key"   # legal team's key (keep it elsewhere in production)
receipt_key = "keys/receipt.key"         # signs the receipts sent to peers
mask_key = "keys/mask.key"               # secret of hash masks (back it up: a new one
                                         # changes every hashed value peers hold)

[audit]                     # one hash-chained entry per request; `connector audit verify`
path = "audit/audit.jsonl"

[revoked]                   # refused at once, also after a reload (SIGHUP or file change)
members = []
serials = []                # certificate serials in hex
"""
