"""Reading and validating connector.toml into one frozen settings object.

Paths in the file are relative to the member's home folder. Unknown sections and keys are
errors: a typo in a security setting must not be silently ignored.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from connector.errors import ConfigError
from connector.process_memory import AUTO, MIN_OVERHEAD, parse_size
from connector.toml_strict import TomlSection, check_nesting

CONFIG_FILE = "connector.toml"
CONFIG_FORMAT = 1
HOME_ENV = "CONNECTOR_HOME"
ENGINES = ("embedded", "opa")
# Where each file of a member's home is unless connector.toml says otherwise: one source for
# the loader, the connector.toml that `connector init` writes and the files it creates.
DEFAULT_PATHS: Mapping[tuple[str, str], str] = {
    ("tls", "cert"): "tls/cert.pem",
    ("tls", "key"): "tls/key.pem",
    ("tls", "ca"): "tls/ca.pem",
    ("store", "path"): "data.duckdb",
    ("store", "quota_ledger"): "state/quota.sqlite",
    ("store", "shaped_copies"): "state/shaped.duckdb",
    ("policies", "dir"): "policies",
    ("policies", "versions_file"): "state/policy_versions.json",
    ("signing", "policy_key"): "keys/policy-signing.key",
    ("signing", "receipt_key"): "keys/receipt.key",
    ("signing", "mask_key"): "keys/mask.key",
    ("audit", "path"): "audit/audit.jsonl",
}
DEFAULT_REFUSAL_BURST = 20  # a member's refusals recorded one by one before throttling
DEFAULT_REFUSALS_PER_MINUTE = 30  # ... and how fast that allowance comes back
DEFAULT_SHAPED_COPIES_MAX_BYTES = "1GiB"
MAX_SECONDS = 7 * 24 * 3600.0
MAX_QUEUE = 1024  # each waiting query holds one of the server's prestarted threads
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
    explains_per_minute: int = 60
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_queries_per_member: int = 4  # at most max_concurrent_queries
    stall_seconds: float = 30.0  # an answer its peer does not read for this long is ended
    shutdown_grace_seconds: float = 10.0  # running queries may finish this long at SIGTERM
    queue_length: int = 64  # queries over max_concurrent_queries that may wait for a slot
    queue_seconds: float = 5.0  # how long one of them waits before it is refused


@dataclass(frozen=True)
class FlightSettings:
    """The Arrow Flight SQL port: off ("") unless connector.toml names one (`init` does)."""

    listen: str = ""


DEFAULT_FLIGHT_LISTEN = "127.0.0.1:50052"  # what `connector init` writes into [flight]


@dataclass(frozen=True)
class PolicySettings:
    """Where policies live, who may sign them and which engine decides."""

    directory: Path
    trusted_signers: Mapping[str, Path]
    engine: str = "embedded"
    opa_url: str = ""
    reload_seconds: float = 2.0
    opa_token_file: Path | None = None  # a bearer token for the OPA server, in a file
    opa_ca: Path | None = None  # the CA that signed the OPA server's HTTPS certificate
    mask_consistency: str = "warn"  # or "refuse": see policy/consistency.py
    versions_file: Path | None = None  # highest version in force per policy (None: not kept)


@dataclass(frozen=True)
class MetricsSettings:
    """Where the Prometheus endpoint listens ("" when off, the default)."""

    listen: str = ""
    example_listen: ClassVar[str] = "127.0.0.1:9464"  # what the written connector.toml suggests


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
    refusal_burst: int  # a member's refusals recorded one by one before they are throttled
    refusals_per_minute: int  # ... and how fast that allowance comes back
    quota_ledger: Path
    shaped_copies: Path
    server: ServerSettings
    policies: PolicySettings
    revoked: Revocations = field(default_factory=Revocations)
    shaped_copies_max_bytes: int = 1024**3  # scratch space for shaped copies (in bytes)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    flight: FlightSettings = field(default_factory=FlightSettings)


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
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path} not found: run `connector init {home} --member ID --dataspace DIR` first, "
            f"or pass --home (or set ${HOME_ENV}) to a member's home folder"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return settings_from_text(text, home)


def settings_from_text(text: str, home: Path) -> Settings:
    """The settings that text would give as HOME/connector.toml (`init` reads its own file
    this way before writing it)."""
    path = home / CONFIG_FILE
    try:
        check_nesting(path, text)
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except RecursionError:  # only if the depth check above missed a way to nest
        raise ConfigError(
            f"{path} is nested too deeply; write it as `connector init` does"
        ) from None
    return _settings_from(raw, home, path)


def _settings_from(raw: dict[str, Any], home: Path, path: Path) -> Settings:
    top = TomlSection(raw, "top level", path)
    fmt = top.whole("format", CONFIG_FORMAT, 1)
    if fmt > CONFIG_FORMAT:
        raise ConfigError(
            f"{path} has format {fmt}, written for a newer connector (this one reads "
            f"format {CONFIG_FORMAT}); upgrade the connector"
        )
    sections = {name: TomlSection(top.table(name), name, path) for name in _SECTIONS}
    top.finish()
    member, audit = sections["member"], sections["audit"]

    def in_home(section: str, key: str) -> Path:
        return home / sections[section].text(key, DEFAULT_PATHS[section, key])

    settings = Settings(
        home=home,
        member_id=member.text("id"),
        dataspace=member.text("dataspace"),
        cert=in_home("tls", "cert"),
        key=in_home("tls", "key"),
        ca=in_home("tls", "ca"),
        database=in_home("store", "path"),
        policy_signing_key=in_home("signing", "policy_key"),
        receipt_key=in_home("signing", "receipt_key"),
        mask_key=in_home("signing", "mask_key"),
        audit_log=in_home("audit", "path"),
        refusal_burst=audit.whole("refusal_burst", DEFAULT_REFUSAL_BURST, 1),
        refusals_per_minute=audit.whole("refusals_per_minute", DEFAULT_REFUSALS_PER_MINUTE, 1),
        quota_ledger=in_home("store", "quota_ledger"),
        shaped_copies=in_home("store", "shaped_copies"),
        server=_server(sections["server"]),
        policies=_policies(sections["policies"], home, in_home),
        revoked=_revoked(sections["revoked"]),
        shaped_copies_max_bytes=_byte_size(
            sections["store"], "shaped_copies_max_bytes", DEFAULT_SHAPED_COPIES_MAX_BYTES
        ),
        metrics=_metrics(sections["metrics"]),
        flight=_flight(sections["flight"]),
    )
    for section in sections.values():
        section.finish()
    return settings


_SECTIONS = (
    "member",
    "server",
    "tls",
    "store",
    "policies",
    "signing",
    "audit",
    "revoked",
    "metrics",
    "flight",
)
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def _flight(section: TomlSection) -> FlightSettings:
    # A home made before the Flight SQL port existed has no [flight]: the port stays off.
    return FlightSettings(
        listen=_optional_listen(section, DEFAULT_FLIGHT_LISTEN, "turn the Flight SQL port off")
    )


def _server(section: TomlSection) -> ServerSettings:
    memory = section.text("memory_limit", ServerSettings.memory_limit)
    if not _SIZE.fullmatch(memory.strip()):
        raise ConfigError(
            f"{section.path}: [server] memory_limit {memory!r} is not a size like '1GB' or '512MiB'"
        )
    total = section.whole("max_concurrent_queries", ServerSettings.max_concurrent_queries, 1)
    per_member = section.whole("max_concurrent_queries_per_member", max(1, total // 2), 1)
    if per_member > total:
        raise ConfigError(
            f"{section.path}: [server] max_concurrent_queries_per_member ({per_member}) must "
            f"not exceed max_concurrent_queries ({total})"
        )
    return ServerSettings(
        listen=section.text("listen", ServerSettings.listen),
        max_query_seconds=section.number(
            "max_query_seconds", ServerSettings.max_query_seconds, 0.1, MAX_SECONDS
        ),
        memory_limit=memory,
        process_memory_limit=_process_memory(section, memory),
        threads=section.whole("threads", ServerSettings.threads, 1),
        batch_rows=section.whole("batch_rows", ServerSettings.batch_rows, 1),
        max_concurrent_queries=total,
        explains_per_minute=section.whole(
            "explains_per_minute", ServerSettings.explains_per_minute, 1
        ),
        max_message_bytes=section.whole(
            "max_message_bytes", ServerSettings.max_message_bytes, 1024
        ),
        max_concurrent_queries_per_member=per_member,
        stall_seconds=section.number(
            "stall_seconds", ServerSettings.stall_seconds, 0.1, MAX_SECONDS
        ),
        shutdown_grace_seconds=section.number(
            "shutdown_grace_seconds", ServerSettings.shutdown_grace_seconds, 0, 3600
        ),
        queue_length=section.whole("queue_length", ServerSettings.queue_length, 0, MAX_QUEUE),
        queue_seconds=section.number("queue_seconds", ServerSettings.queue_seconds, 0, 600),
    )


def _metrics(section: TomlSection) -> MetricsSettings:
    return MetricsSettings(
        listen=_optional_listen(section, MetricsSettings.example_listen, "serve no metrics")
    )


def _optional_listen(section: TomlSection, example: str, empty_means: str) -> str:
    """The section's `listen`: HOST:PORT, or "" (also when left out) for no such port."""
    listen = section.text("listen", "").strip()
    found = _HOST_PORT.fullmatch(listen)
    if listen and (found is None or int(found.group(2)) > 65535):
        raise ConfigError(
            f'{section.path}: [{section.name}] listen must be "HOST:PORT" (like "{example}"), '
            f'or "" to {empty_means}, not {listen[:60]!r}'
        )
    return listen


_UNITS = {"b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4}
_UNITS.update({"kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4})


def _byte_size(section: TomlSection, key: str, default: str) -> int:
    """A size in bytes, written as a whole number or as text such as '512MiB' (at least 1 MiB)."""
    value = section.value(key, (int, str), default)
    if isinstance(value, int):
        size = value
    else:
        found = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)", value.strip())
        unit = found.group(2).lower() if found else ""
        if not found or unit not in _UNITS:
            raise ConfigError(
                f"{section.path}: [{section.name}] {key} {value!r} is not a size like '1GiB'"
            )
        size = int(float(found.group(1)) * _UNITS[unit])
    if size < 1024**2:
        raise ConfigError(f"{section.path}: [{section.name}] {key} must be at least 1MiB")
    return size


def _process_memory(section: TomlSection, memory_limit: str) -> str:
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


def _policies(
    section: TomlSection, home: Path, in_home: Callable[[str, str], Path]
) -> PolicySettings:
    engine = section.text("engine", PolicySettings.engine)
    if engine not in ENGINES:
        raise ConfigError(
            f"{section.path}: [policies] engine must be one of {', '.join(ENGINES)}, not {engine!r}"
        )
    opa_url = section.text("opa_url", PolicySettings.opa_url)
    if engine == "opa" and not opa_url:
        raise ConfigError(f"{section.path}: [policies] engine = 'opa' needs opa_url")
    mask_consistency = section.text("mask_consistency", PolicySettings.mask_consistency)
    if mask_consistency not in ("warn", "refuse"):
        raise ConfigError(
            f"{section.path}: [policies] mask_consistency must be 'warn' or 'refuse', not "
            f"{mask_consistency!r}"
        )
    token_file = section.text("opa_token_file", "")
    opa_ca = section.text("opa_ca", "")
    if opa_ca and not opa_url.startswith("https://"):
        raise ConfigError(f"{section.path}: [policies] opa_ca needs an https:// opa_url")
    signers = section.table("trusted_signers")
    if not all(isinstance(v, str) for v in signers.values()):
        raise ConfigError(
            f"{section.path}: [policies.trusted_signers] maps a signer name to a public key file"
        )
    return PolicySettings(
        directory=in_home("policies", "dir"),
        trusted_signers={name: home / str(file) for name, file in signers.items()},
        engine=engine,
        opa_url=opa_url,
        opa_token_file=home / token_file if token_file else None,
        opa_ca=home / opa_ca if opa_ca else None,
        mask_consistency=mask_consistency,
        reload_seconds=section.number(
            "reload_seconds", PolicySettings.reload_seconds, 0.1, MAX_SECONDS
        ),
        versions_file=in_home("policies", "versions_file"),
    )


def _revoked(section: TomlSection) -> Revocations:
    serials: set[int] = set()
    for text in section.strings("serials"):
        try:
            serials.add(int(text.replace(":", ""), 16))
        except ValueError:
            raise ConfigError(
                f"{section.path}: [revoked] serials holds {text!r}, not a hexadecimal serial"
            ) from None
    return Revocations(members=frozenset(section.strings("members")), serials=frozenset(serials))
