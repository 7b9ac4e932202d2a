"""The daemon's configuration: a TOML file (``--config FILE``) whose keys command-line flags override.

Every key has a default, so an empty file (or none) gives a working daemon on loopback::

    data_dir = "./thinblock-data"
    metadata = "sqlite:"            # the metadata store: sqlite: (in data_dir) or postgresql://USER@HOST/DB
    log_level = "info"              # debug, info, warning, error
    log_format = "logfmt"           # logfmt (key=value) or json
    event_loop = "uvloop"           # uvloop, or asyncio (the standard loop, for debugging)

    [nbd]
    listen = "127.0.0.1:10809"      # "" to disable TCP
    unix_socket = ""                # e.g. "/run/thinblock/nbd.sock"
    default_export = "vol0"         # the volume a client gets with an empty export name; "" for none
    tls = "off"                     # off, allowed (STARTTLS at the client's choice), required
    tls_cert = ""                   # PEM server certificate (chain) for STARTTLS
    tls_key = ""                    # its PEM private key
    tls_ca = ""                     # PEM CA: clients must present a certificate it signed
    tls_psk_file = ""               # TLS-PSK instead of X.509: identity:hexkey lines (qemu's keys.psk)
    max_connections = 256           # per listener (TCP, Unix socket); past it connections are refused
    max_connections_per_client = 128    # per client address and listener; 0: no limit of this kind
    handshake_timeout = 30.0        # seconds a client may take to reach transmission
    idle_timeout = 300.0            # seconds a client in transmission may send nothing; 0: no limit
    idle_exempt = []                # clients it never closes: "10.1.0.0/16", "psk:backup", "CN=...", "unix"
    max_bytes_in_flight = "1GiB"    # request payloads in flight, all connections together

    [[nbd.access]]                  # per-volume access lists (none: every volume open to all)
    volume = "db1"                  # or "*" for every volume
    clients = ["CN=app-1,O=example", "10.1.0.0/16", "unix"]   # certificate subjects, networks
    mode = "rw"                     # or "ro", or "deny" (beats any rule that allows)

    [iscsi]                         # off unless listen is set (or --iscsi HOST:PORT)
    listen = ""                     # e.g. "0.0.0.0:3260" (port 3260 when omitted)
    node_name = ""                  # targets are iqn.2026-12.org.thinblock:NODE:VV; default: the host name
    chap_user = ""                  # CHAP the initiators must prove (both set: CHAP required)
    chap_secret = ""                # 12 to 16 characters (RFC 7143 12.1.3)
    mutual_user = ""                # mutual CHAP: what the target proves back
    mutual_secret = ""
    login_timeout = 30.0            # seconds a connection may take to log in
    nop_interval = 15.0             # ping (NOP-In) a connection idle this long; 0: never
    nop_timeout = 30.0              # close a connection that does not answer the ping in this
    max_connections = 256           # on the listener; past it connections are refused
    max_connections_per_client = 128    # per initiator address; 0: no limit of this kind
    [iscsi.acl]                     # per VV: the initiator names allowed ("*" key: every VV)
    # vol0 = ["iqn.1993-08.org.debian:01:host1"]

    [api]
    listen = "127.0.0.1:8080"
    token = ""                      # bearer token; required when `listen` is not a loopback address
    require_token = false           # demand the token even on loopback
    tls_cert = ""                   # PEM certificate (chain): the API speaks HTTPS when given
    tls_key = ""                    # its PEM private key
    allowed_hosts = []              # extra Host names the API answers to (e.g. "thinblock.example.com:8080")

    [engine]
    chunklet_size = "256MiB"        # default for `pd add` without --chunklet-size, and first-start PDs
    max_dirty_bytes = "256MiB"      # write-back cache bound: writers wait beyond it
    destage_delay = 0.05            # seconds dirty data may sit before destage starts
    default_cache_mode = "writethrough"
    io_threads = 4                  # threads for large write-through writes; 0: all on the event loop
    offload_min = "128KiB"          # writes (per region) of this size or more go to those threads
    pd_allowed_roots = []           # directories where file PDs may lie besides data_dir
    pd_check_interval = 5.0         # seconds between checks of every PD's file and header; 0: none
    pd_direct_io = false            # PDs opened for direct I/O too (aligned I/O bypasses the page cache)

    [webhook]
    url = ""                        # alerts are POSTed here as JSON
    timeout = 5.0                   # seconds per attempt
    max_attempts = 8                # then the alert is dropped (and logged)
    queue_size = 1000               # alerts waiting for delivery; the oldest is dropped beyond it

    [metrics]
    latency_histograms = true       # time every NBD request (about a microsecond each)

    [history]                       # allocation and I/O over time (dashboard charts, forecast)
    interval = 5.0                  # seconds between samples
    keep = 10800.0                  # seconds kept (3 h), in memory
    forecast_horizon = 86400.0      # alert pool-limit-forecast when a pool's limit is nearer (24 h)
    forecast_min_window = 900.0     # ... once the rate was measured over this long at least

    [first_start]                   # what the daemon creates in an empty data directory
    enabled = true
    pds = 4
    pd_size = "64GiB"               # sparse files: no real space until written
    pool = "default"
    raid = 1
    region_size = "1MiB"
    growth_increment = "1GiB"
    volume = "vol0"
    volume_size = "100GiB"

Sizes are integers (bytes) or strings with units ("512K", "16MiB", "1G", "2TiB").
"""

from __future__ import annotations

import ipaddress
import tomllib
import urllib.parse
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import InvalidArgument
from .model import CacheMode
from .nbd.access import AccessRule, parse_client
from .units import GiB, KiB, MiB, parse_size

DEFAULT_NBD_PORT = 10809
DEFAULT_ISCSI_PORT = 3260
DEFAULT_API_PORT = 8080
DEFAULT_MIRROR_PORT = 10810
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
EVENT_LOOPS = ("uvloop", "asyncio")
NBD_TLS_MODES = ("off", "allowed", "required")


class ConfigError(InvalidArgument):
    """The configuration file or a flag is wrong; the message names the key."""


@dataclass(frozen=True, slots=True)
class Listen:
    """A TCP listen address.  ``port`` 0 lets the system pick one (tests)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, what: str, default_port: int) -> Listen:
        """``"127.0.0.1:8080"``, ``"[::1]:8080"``, ``"localhost"``, ``":8080"`` (loopback)."""
        text = text.strip()
        if not text:
            raise ConfigError(f"{what}: empty address")
        host, port_text = text, ""
        if text.startswith("["):
            close = text.find("]")
            if close < 0:
                raise ConfigError(f"{what}: unclosed '[' in {text!r}")
            host, rest = text[1:close], text[close + 1 :]
            if rest and not rest.startswith(":"):
                raise ConfigError(f"{what}: expected HOST:PORT, not {text!r}")
            port_text = rest[1:]
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        elif text.count(":") > 1:
            raise ConfigError(f"{what}: write IPv6 addresses as [ADDR]:PORT, not {text!r}")
        host = host or "127.0.0.1"
        if not port_text:
            port = default_port
        else:
            try:
                port = int(port_text)
            except ValueError:
                raise ConfigError(f"{what}: not a port number: {port_text!r}") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"{what}: port out of range: {port}")
        return cls(host, port)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name other than localhost: may resolve anywhere

    def url_host(self) -> str:
        return f"[{self.host}]" if ":" in self.host else self.host

    def __str__(self) -> str:
        return f"{self.url_host()}:{self.port}"


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str | None = None
    timeout: float = 5.0
    max_attempts: int = 8
    queue_size: int = 1000


@dataclass(frozen=True, slots=True)
class FirstStartConfig:
    enabled: bool = True
    pds: int = 4
    pd_size: int = 64 * GiB
    pool: str = "default"
    raid: int = 1
    region_size: int = 1 * MiB
    growth_increment: int = 1 * GiB
    volume: str = "vol0"
    volume_size: int = 100 * GiB


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The node pair (``[node]``): this node's name, where its partner's mirror listener is, where
    its own listens, and how long the partner may stay silent before the owner degrades."""

    name: str | None = None
    partner: Listen | None = None
    mirror_listen: Listen = field(default_factory=lambda: Listen("127.0.0.1", DEFAULT_MIRROR_PORT))
    partner_timeout: float = 1.0
    # Takeover (on one machine): the partner's data directory, and the NBD address it serves its
    # volumes on (its service address), which this node binds when it takes them over.
    partner_data: Path | None = None
    partner_service: Listen | None = None
    # On PostgreSQL (issue 12, point 4-5): the partner's metadata store (a takeover takes its
    # lease node:NAME there, epoch + 1), this node's lease's time to live, and how long before
    # the lease's expiry this node stops writing (fence.py).
    partner_metadata: str | None = None
    lease_ttl: float = 15.0
    fence_margin: float = 1.0
    # FLUSH and FUA of a write-back volume answered on the two copies while the mirror is in
    # sync and the partner takes over (claim 3).  False: they destage and fsync as without a
    # partner (two nodes on one machine share its power: a power cut loses both copies).
    flush_on_two_copies: bool = True
    # Planned moves and placement (issue 12, step 6; node/move.py): the partner's REST API (its
    # base URL) and a file holding an admin token it accepts (none: its API demands no token).
    partner_api: str | None = None
    partner_api_token_file: Path | None = None


@dataclass(frozen=True, slots=True)
class ISCSIConfig:
    listen: Listen | None = None  # off unless asked
    node_name: str | None = None
    chap_user: str | None = None
    chap_secret: str | None = None
    mutual_user: str | None = None
    mutual_secret: str | None = None
    login_timeout: float = 30.0
    nop_interval: float = 15.0  # an idle connection is pinged (NOP-In) after this; 0: never
    nop_timeout: float = 30.0  # a ping not answered within this closes the connection
    max_connections: int = 256  # on the listener; past it connections are refused
    max_connections_per_client: int = 128  # per initiator address; 0: no limit of this kind
    acl: tuple[tuple[str, tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    data_dir: Path = Path("./thinblock-data")
    metadata: str | None = None  # store URL; None: SQLite in data_dir (metadata.open_store)
    log_level: str = "info"
    log_format: str = "logfmt"
    event_loop: str = "uvloop"
    nbd_listen: Listen | None = field(default_factory=lambda: Listen("127.0.0.1", DEFAULT_NBD_PORT))
    nbd_unix_socket: Path | None = None
    default_export: str | None = "vol0"
    nbd_tls: str = "off"
    nbd_tls_cert: Path | None = None
    nbd_tls_key: Path | None = None
    nbd_tls_ca: Path | None = None
    nbd_tls_psk_file: Path | None = None
    nbd_access: tuple[AccessRule, ...] = ()
    nbd_max_connections: int = 256
    nbd_max_connections_per_client: int = 128
    nbd_handshake_timeout: float = 30.0
    nbd_idle_timeout: float = 300.0
    nbd_idle_exempt: tuple[str, ...] = ()
    nbd_max_bytes_in_flight: int = 1 * GiB
    api_listen: Listen = field(default_factory=lambda: Listen("127.0.0.1", DEFAULT_API_PORT))
    api_token: str | None = None
    api_require_token: bool = False
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None
    api_allowed_hosts: tuple[str, ...] = ()
    chunklet_size: int = 256 * MiB
    max_dirty_bytes: int = 256 * MiB
    destage_delay: float = 0.05
    default_cache_mode: CacheMode = CacheMode.WRITETHROUGH
    io_threads: int = 4
    offload_min: int = 128 * KiB
    pd_allowed_roots: tuple[Path, ...] = ()
    pd_check_interval: float = 5.0
    pd_direct_io: bool = False
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
    iscsi: ISCSIConfig = field(default_factory=ISCSIConfig)
    latency_histograms: bool = True
    history_interval: float = 5.0
    history_keep: float = 3 * 3600.0
    forecast_horizon: float = 24 * 3600.0
    forecast_min_window: float = 15 * 60.0
    first_start: FirstStartConfig = field(default_factory=FirstStartConfig)
    node: NodeConfig = field(default_factory=NodeConfig)

    @property
    def token_required(self) -> bool:
        """The API demands the bearer token: when it listens off loopback (the issue's rule), when
        ``api.require_token`` says so, and whenever a token is configured (an administrator who set
        one expects it to be enforced)."""
        return self.api_require_token or self.api_token is not None or not self.api_listen.is_loopback

    def validate(self) -> Config:
        """Cross-key rules; raises ConfigError.  Called before anything is opened or bound."""
        if self.token_required and not self.api_token:
            where = "off loopback" if not self.api_listen.is_loopback else "with api.require_token"
            raise ConfigError(
                f"the API listens on {self.api_listen} ({where}): set api.token in the config file "
                "(or --api-token, or the THINBLOCK_API_TOKEN environment variable) so that it is not open to anyone"
            )
        if self.nbd_tls_psk_file is not None:
            if self.nbd_tls == "off":
                raise ConfigError(
                    "nbd.tls_psk_file is set but nbd.tls is off: set nbd.tls to allowed or required"
                )
            if self.nbd_tls_cert is not None or self.nbd_tls_ca is not None:
                raise ConfigError(
                    "nbd.tls_psk_file and nbd.tls_cert/tls_ca: TLS with PSK or with X.509, not both"
                )
        elif self.nbd_tls != "off" and (self.nbd_tls_cert is None or self.nbd_tls_key is None):
            raise ConfigError(
                f"nbd.tls = {self.nbd_tls!r} needs nbd.tls_cert and nbd.tls_key (or nbd.tls_psk_file)"
            )
        if self.nbd_tls_ca is not None and self.nbd_tls == "off":
            raise ConfigError("nbd.tls_ca is set but nbd.tls is off: set nbd.tls to allowed or required")
        if (self.api_tls_cert is None) != (self.api_tls_key is None):
            raise ConfigError("api.tls_cert and api.tls_key go together: give both or neither")
        if self.nbd_listen is None and self.nbd_unix_socket is None:
            raise ConfigError("NBD has nowhere to listen: give nbd.listen or nbd.unix_socket")
        if self.node.partner is not None and not self.node.name:
            raise ConfigError("node.partner is set: give this node a name too (node.name, --node)")
        if (self.node.partner_data is None) != (self.node.partner_service is None):
            raise ConfigError("takeover needs both node.partner_data and node.partner_service")
        if self.node.partner_data is not None and self.node.partner is None:
            raise ConfigError("node.partner_data is set without node.partner")
        if self.node.partner_metadata is not None and self.node.partner_data is None:
            raise ConfigError("node.partner_metadata is set without node.partner_data")
        if self.node.partner_metadata is not None:
            from .metadata import store_kind

            if _metadata_url(self.node.partner_metadata, "node.partner_metadata") is None or (
                store_kind(self.node.partner_metadata) != "postgresql"
            ):
                raise ConfigError("node.partner_metadata must be a postgresql:// URL")
            if store_kind(self.metadata) != "postgresql":
                raise ConfigError("node.partner_metadata is PostgreSQL: this node's metadata must be too")
        if self.node.partner_api is not None:
            if self.node.partner is None:
                raise ConfigError("node.partner_api is set without node.partner")
            api = urllib.parse.urlsplit(self.node.partner_api)
            if api.scheme not in ("http", "https") or not api.hostname or api.path not in ("", "/"):
                raise ConfigError(
                    f"node.partner_api must be the partner's API as http[s]://HOST:PORT, not {self.node.partner_api!r}"
                )
        if self.node.partner_api_token_file is not None and self.node.partner_api is None:
            raise ConfigError("node.partner_api_token_file is set without node.partner_api")
        if not 0 < self.node.fence_margin < self.node.lease_ttl * 2 / 3:
            raise ConfigError("node.fence_margin must be above 0 and below two thirds of node.lease_ttl")
        i = self.iscsi
        if bool(i.chap_user) != bool(i.chap_secret):
            raise ConfigError("iscsi.chap_user and iscsi.chap_secret go together")
        if bool(i.mutual_user) != bool(i.mutual_secret):
            raise ConfigError("iscsi.mutual_user and iscsi.mutual_secret go together")
        if i.mutual_user and not i.chap_user:
            raise ConfigError("mutual CHAP needs one-way CHAP too: set iscsi.chap_user and iscsi.chap_secret")
        for key, secret in (("chap_secret", i.chap_secret), ("mutual_secret", i.mutual_secret)):
            if secret and not 12 <= len(secret) <= 255:
                raise ConfigError(f"iscsi.{key}: 12 characters at least (RFC 7143 12.1.3 asks for 96 bits)")
        if i.chap_secret and i.chap_secret == i.mutual_secret:
            raise ConfigError("iscsi.mutual_secret must differ from iscsi.chap_secret (RFC 7143 12.1.3)")
        return self


# --- parsing -----------------------------------------------------------------------------------


def _metadata_url(value: str, key: str) -> str | None:
    """A metadata store URL (checked for its kind here, so a typo stops the daemon before it binds
    anything); "" or "sqlite:" is the default, SQLite in the data directory."""
    from .metadata import store_kind

    value = value.strip()
    if not value or value == "sqlite:":
        return None
    try:
        store_kind(value)
    except InvalidArgument as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return value


def _size(value: Any, key: str, *, positive: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{key}: expected a size (bytes or a string like '16MiB'), not {value!r}")
    try:
        n = parse_size(value)
    except InvalidArgument as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if positive and n <= 0:
        raise ConfigError(f"{key}: must be greater than zero")
    return n


def _int(value: Any, key: str, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, not {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be between {low} and {high}, not {value}")
    return value


def _float(value: Any, key: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number, not {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{key}: must be between {low} and {high}, not {value}")
    return float(value)


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, not {value!r}")
    return value


def _optional_str(value: Any, key: str) -> str | None:
    """Empty string means "not set" (TOML has no null)."""
    text = _str(value, key).strip()
    return text or None


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, not {value!r}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    text = _str(value, key).lower()
    if text not in choices:
        raise ConfigError(f"{key}: expected one of {', '.join(choices)}, not {value!r}")
    return text


def _table(doc: dict[str, Any], name: str, known: set[str]) -> dict[str, Any]:
    table = doc.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"unknown key in [{name}]: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    return table


_TOP_KEYS = {"data_dir", "metadata", "log_level", "log_format", "event_loop"}
_TABLES = {
    "nbd": {
        "listen",
        "unix_socket",
        "default_export",
        "tls",
        "tls_cert",
        "tls_key",
        "tls_ca",
        "tls_psk_file",
        "access",
        "max_connections",
        "max_connections_per_client",
        "handshake_timeout",
        "idle_timeout",
        "idle_exempt",
        "max_bytes_in_flight",
    },
    "api": {"listen", "token", "require_token", "tls_cert", "tls_key", "allowed_hosts"},
    "iscsi": {
        "listen",
        "node_name",
        "chap_user",
        "chap_secret",
        "mutual_user",
        "mutual_secret",
        "login_timeout",
        "nop_interval",
        "nop_timeout",
        "max_connections",
        "max_connections_per_client",
        "acl",
    },
    "engine": {
        "chunklet_size",
        "max_dirty_bytes",
        "destage_delay",
        "default_cache_mode",
        "io_threads",
        "offload_min",
        "pd_check_interval",
        "pd_allowed_roots",
        "pd_direct_io",
    },
    "webhook": {"url", "timeout", "max_attempts", "queue_size"},
    "metrics": {"latency_histograms"},
    "history": {"interval", "keep", "forecast_horizon", "forecast_min_window"},
    "first_start": {f.name for f in fields(FirstStartConfig)},
    "node": {
        "name",
        "partner",
        "mirror_listen",
        "partner_timeout",
        "partner_data",
        "partner_service",
        "partner_metadata",
        "lease_ttl",
        "fence_margin",
        "flush_on_two_copies",
        "partner_api",
        "partner_api_token_file",
    },
}


def _connection_limits(table: dict[str, Any], section: str) -> dict[str, int]:
    """A listener's admission keys (netlimits.ConnectionLimits), the same for NBD and iSCSI:
    ``max_connections`` (at least 1) and ``max_connections_per_client`` (0: no such limit)."""
    out = {}
    for key, low in (("max_connections", 1), ("max_connections_per_client", 0)):
        if key in table:
            out[key] = _int(table[key], f"{section}.{key}", low=low, high=65536)
    return out


def _access_rules(entries: Any) -> tuple[AccessRule, ...]:
    """``[[nbd.access]]`` tables: volume, clients (a list), mode."""
    if not isinstance(entries, list):
        raise ConfigError("nbd.access: expected [[nbd.access]] tables")
    rules: list[AccessRule] = []
    for i, entry in enumerate(entries):
        where = f"nbd.access[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table with volume, clients and mode")
        unknown = sorted(set(entry) - {"volume", "clients", "mode"})
        if unknown:
            raise ConfigError(f"{where}: unknown key {', '.join(unknown)} (known: clients, mode, volume)")
        volume = _str(entry.get("volume", ""), f"{where}.volume").strip()
        mode = _choice(entry.get("mode", "rw"), f"{where}.mode", ("ro", "rw", "deny"))
        clients = entry.get("clients")
        if not isinstance(clients, list) or not clients or not all(isinstance(c, str) for c in clients):
            raise ConfigError(f"{where}.clients: expected a non-empty list of clients")
        if not volume:
            raise ConfigError(f"{where}.volume: give a volume name or *")
        for client in clients:
            try:
                rules.append(AccessRule(volume, parse_client(client), mode))  # type: ignore[arg-type]
            except ValueError as exc:
                raise ConfigError(f"{where}.clients: {exc}") from None
    return tuple(rules)


def parse_config(doc: dict[str, Any], *, base_dir: Path | None = None) -> Config:
    """Build a Config from a parsed TOML document.  Relative paths are relative to ``base_dir``
    (the config file's directory), so a config file means the same wherever it is started from."""
    unknown = sorted(set(doc) - _TOP_KEYS - set(_TABLES))
    if unknown:
        raise ConfigError(
            f"unknown key: {', '.join(unknown)} (known: {', '.join(sorted(_TOP_KEYS | set(_TABLES)))})"
        )
    tables = {name: _table(doc, name, known) for name, known in _TABLES.items()}

    def path(value: Any, key: str) -> Path:
        p = Path(_str(value, key)).expanduser()
        return p if p.is_absolute() or base_dir is None else base_dir / p

    cfg = Config()
    changes: dict[str, Any] = {}
    if "data_dir" in doc:
        changes["data_dir"] = path(doc["data_dir"], "data_dir")
    if "metadata" in doc:
        changes["metadata"] = _metadata_url(_str(doc["metadata"], "metadata"), "metadata")
    if "log_level" in doc:
        changes["log_level"] = _choice(doc["log_level"], "log_level", LOG_LEVELS)
    if "log_format" in doc:
        changes["log_format"] = _choice(doc["log_format"], "log_format", LOG_FORMATS)
    if "event_loop" in doc:
        changes["event_loop"] = _choice(doc["event_loop"], "event_loop", EVENT_LOOPS)

    nbd = tables["nbd"]
    if "listen" in nbd:
        text = _str(nbd["listen"], "nbd.listen")
        changes["nbd_listen"] = (
            Listen.parse(text, what="nbd.listen", default_port=DEFAULT_NBD_PORT) if text.strip() else None
        )
    if "unix_socket" in nbd:
        sock = _optional_str(nbd["unix_socket"], "nbd.unix_socket")
        changes["nbd_unix_socket"] = path(sock, "nbd.unix_socket") if sock else None
    if "default_export" in nbd:
        changes["default_export"] = _optional_str(nbd["default_export"], "nbd.default_export")
    if "tls" in nbd:
        changes["nbd_tls"] = _choice(nbd["tls"], "nbd.tls", NBD_TLS_MODES)
    if "access" in nbd:
        changes["nbd_access"] = _access_rules(nbd["access"])
    for key in ("tls_cert", "tls_key", "tls_ca", "tls_psk_file"):
        if key in nbd:
            given = _optional_str(nbd[key], f"nbd.{key}")
            changes[f"nbd_{key}"] = path(given, f"nbd.{key}") if given else None
    changes.update({f"nbd_{key}": value for key, value in _connection_limits(nbd, "nbd").items()})
    if "handshake_timeout" in nbd:
        changes["nbd_handshake_timeout"] = _float(
            nbd["handshake_timeout"], "nbd.handshake_timeout", low=0.1, high=3600
        )
    if "idle_timeout" in nbd:
        changes["nbd_idle_timeout"] = _float(nbd["idle_timeout"], "nbd.idle_timeout", low=0, high=7 * 86400)
    if "idle_exempt" in nbd:
        exempt = nbd["idle_exempt"]
        if not isinstance(exempt, list) or not all(isinstance(c, str) for c in exempt):
            raise ConfigError(f"nbd.idle_exempt: expected a list of clients, not {exempt!r}")
        try:
            changes["nbd_idle_exempt"] = tuple(parse_client(c) for c in exempt)
        except ValueError as exc:
            raise ConfigError(f"nbd.idle_exempt: {exc}") from None
    if "max_bytes_in_flight" in nbd:
        changes["nbd_max_bytes_in_flight"] = _size(nbd["max_bytes_in_flight"], "nbd.max_bytes_in_flight")

    iscsi = tables["iscsi"]
    icfg = cfg.iscsi
    i_changes: dict[str, Any] = {}
    if "listen" in iscsi:
        text = _str(iscsi["listen"], "iscsi.listen")
        i_changes["listen"] = (
            Listen.parse(text, what="iscsi.listen", default_port=DEFAULT_ISCSI_PORT) if text.strip() else None
        )
    for key in ("node_name", "chap_user", "chap_secret", "mutual_user", "mutual_secret"):
        if key in iscsi:
            i_changes[key] = _optional_str(iscsi[key], f"iscsi.{key}")
    if "login_timeout" in iscsi:
        i_changes["login_timeout"] = _float(iscsi["login_timeout"], "iscsi.login_timeout", low=0.1, high=3600)
    if "nop_interval" in iscsi:
        i_changes["nop_interval"] = _float(iscsi["nop_interval"], "iscsi.nop_interval", low=0, high=3600)
    if "nop_timeout" in iscsi:
        i_changes["nop_timeout"] = _float(iscsi["nop_timeout"], "iscsi.nop_timeout", low=0.1, high=3600)
    i_changes.update(_connection_limits(iscsi, "iscsi"))
    if "acl" in iscsi:
        acl = iscsi["acl"]
        if not isinstance(acl, dict):
            raise ConfigError("[iscsi.acl] must be a table of VV name -> list of initiator names")
        rules = []
        for vv, names in acl.items():
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise ConfigError(f"iscsi.acl.{vv}: expected a list of initiator names")
            rules.append((str(vv), tuple(names)))
        i_changes["acl"] = tuple(rules)
    changes["iscsi"] = replace(icfg, **i_changes)

    api = tables["api"]
    if "listen" in api:
        changes["api_listen"] = Listen.parse(
            _str(api["listen"], "api.listen"), what="api.listen", default_port=DEFAULT_API_PORT
        )
    if "token" in api:
        changes["api_token"] = _optional_str(api["token"], "api.token")
    if "require_token" in api:
        changes["api_require_token"] = _bool(api["require_token"], "api.require_token")
    for key in ("tls_cert", "tls_key"):
        if key in api:
            given = _optional_str(api[key], f"api.{key}")
            changes[f"api_{key}"] = path(given, f"api.{key}") if given else None
    if "allowed_hosts" in api:
        hosts = api["allowed_hosts"]
        if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
            raise ConfigError(f"api.allowed_hosts: expected a list of host names, not {hosts!r}")
        changes["api_allowed_hosts"] = tuple(h.strip().lower() for h in hosts)

    engine = tables["engine"]
    if "chunklet_size" in engine:
        changes["chunklet_size"] = _size(engine["chunklet_size"], "engine.chunklet_size")
    if "max_dirty_bytes" in engine:
        changes["max_dirty_bytes"] = _size(engine["max_dirty_bytes"], "engine.max_dirty_bytes")
    if "destage_delay" in engine:
        changes["destage_delay"] = _float(engine["destage_delay"], "engine.destage_delay", low=0, high=3600)
    if "default_cache_mode" in engine:
        changes["default_cache_mode"] = CacheMode(
            _choice(engine["default_cache_mode"], "engine.default_cache_mode", tuple(CacheMode))
        )
    if "io_threads" in engine:
        changes["io_threads"] = _int(engine["io_threads"], "engine.io_threads", low=0, high=256)
    if "offload_min" in engine:
        changes["offload_min"] = _size(engine["offload_min"], "engine.offload_min")
    if "pd_allowed_roots" in engine:
        roots = engine["pd_allowed_roots"]
        if not isinstance(roots, list) or not all(isinstance(r, str) and r.strip() for r in roots):
            raise ConfigError(f"engine.pd_allowed_roots: expected a list of directories, not {roots!r}")
        changes["pd_allowed_roots"] = tuple(path(r, "engine.pd_allowed_roots") for r in roots)
    if "pd_direct_io" in engine:
        changes["pd_direct_io"] = _bool(engine["pd_direct_io"], "engine.pd_direct_io")
    if "pd_check_interval" in engine:
        changes["pd_check_interval"] = _float(
            engine["pd_check_interval"], "engine.pd_check_interval", low=0, high=3600
        )

    hook = tables["webhook"]
    webhook = cfg.webhook
    if "url" in hook:
        url = _optional_str(hook["url"], "webhook.url")
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"webhook.url: expected an http:// or https:// URL, not {url!r}")
        webhook = replace(webhook, url=url)
    if "timeout" in hook:
        webhook = replace(webhook, timeout=_float(hook["timeout"], "webhook.timeout", low=0.1, high=600))
    if "max_attempts" in hook:
        webhook = replace(
            webhook, max_attempts=_int(hook["max_attempts"], "webhook.max_attempts", low=1, high=1000)
        )
    if "queue_size" in hook:
        webhook = replace(
            webhook, queue_size=_int(hook["queue_size"], "webhook.queue_size", low=1, high=1_000_000)
        )
    changes["webhook"] = webhook

    if "latency_histograms" in tables["metrics"]:
        changes["latency_histograms"] = _bool(
            tables["metrics"]["latency_histograms"], "metrics.latency_histograms"
        )

    history = tables["history"]
    if "interval" in history:
        changes["history_interval"] = _float(history["interval"], "history.interval", low=0.1, high=3600)
    if "keep" in history:
        changes["history_keep"] = _float(history["keep"], "history.keep", low=60, high=7 * 86400)
    if "forecast_horizon" in history:
        changes["forecast_horizon"] = _float(
            history["forecast_horizon"], "history.forecast_horizon", low=0, high=365 * 86400
        )
    if "forecast_min_window" in history:
        changes["forecast_min_window"] = _float(
            history["forecast_min_window"], "history.forecast_min_window", low=0, high=3600
        )

    first = tables["first_start"]
    fs = cfg.first_start
    fs_changes: dict[str, Any] = {}
    for key, value in first.items():
        name = f"first_start.{key}"
        if key == "enabled":
            fs_changes[key] = _bool(value, name)
        elif key == "pds":
            fs_changes[key] = _int(value, name, low=1, high=1024)
        elif key == "raid":
            fs_changes[key] = _int(value, name, low=0, high=6)
        elif key in ("pool", "volume"):
            fs_changes[key] = _str(value, name)
        else:
            fs_changes[key] = _size(value, name)
    changes["first_start"] = replace(fs, **fs_changes)

    node = tables["node"]
    node_cfg = cfg.node
    if "name" in node:
        node_cfg = replace(node_cfg, name=_node_name(node["name"], "node.name"))
    if "partner" in node:
        text = _str(node["partner"], "node.partner")
        node_cfg = replace(
            node_cfg,
            partner=Listen.parse(text, what="node.partner", default_port=DEFAULT_MIRROR_PORT)
            if text.strip()
            else None,
        )
    if "mirror_listen" in node:
        node_cfg = replace(
            node_cfg,
            mirror_listen=Listen.parse(
                _str(node["mirror_listen"], "node.mirror_listen"),
                what="node.mirror_listen",
                default_port=DEFAULT_MIRROR_PORT,
            ),
        )
    if "partner_timeout" in node:
        node_cfg = replace(
            node_cfg,
            partner_timeout=_float(node["partner_timeout"], "node.partner_timeout", low=0.05, high=600),
        )
    if "partner_data" in node:
        data = _optional_str(node["partner_data"], "node.partner_data")
        node_cfg = replace(node_cfg, partner_data=path(data, "node.partner_data") if data else None)
    if "partner_service" in node:
        text = _str(node["partner_service"], "node.partner_service")
        node_cfg = replace(
            node_cfg,
            partner_service=Listen.parse(text, what="node.partner_service", default_port=DEFAULT_NBD_PORT)
            if text.strip()
            else None,
        )
    if "partner_metadata" in node:
        url = _optional_str(node["partner_metadata"], "node.partner_metadata")
        node_cfg = replace(node_cfg, partner_metadata=url or None)
    if "lease_ttl" in node:
        node_cfg = replace(
            node_cfg, lease_ttl=_float(node["lease_ttl"], "node.lease_ttl", low=0.5, high=3600)
        )
    if "fence_margin" in node:
        node_cfg = replace(
            node_cfg, fence_margin=_float(node["fence_margin"], "node.fence_margin", low=0.05, high=3600)
        )
    if "flush_on_two_copies" in node:
        node_cfg = replace(
            node_cfg, flush_on_two_copies=_bool(node["flush_on_two_copies"], "node.flush_on_two_copies")
        )
    if "partner_api" in node:
        url = _optional_str(node["partner_api"], "node.partner_api")
        node_cfg = replace(node_cfg, partner_api=(url or "").strip().rstrip("/") or None)
    if "partner_api_token_file" in node:
        token_file = _optional_str(node["partner_api_token_file"], "node.partner_api_token_file")
        node_cfg = replace(
            node_cfg,
            partner_api_token_file=path(token_file, "node.partner_api_token_file") if token_file else None,
        )
    changes["node"] = node_cfg
    return replace(cfg, **changes)


def _node_name(value: Any, key: str) -> str:
    name = _str(value, key)
    if not name or len(name.encode()) > 255 or not name.isprintable() or name.strip() != name:
        raise ConfigError(
            f"{key}: a node name is 1..255 printable bytes without surrounding spaces, not {name!r}"
        )
    return name


def load_config(path: str | Path | None) -> Config:
    """Read a TOML config file (None: all defaults).  Raises ConfigError with the file name."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        with p.open("rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    try:
        return parse_config(doc, base_dir=p.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def apply_overrides(cfg: Config, **flags: Any) -> Config:
    """Command-line flags win over the file.  ``None`` means "flag not given".

    Accepted: data_dir, metadata, nbd (HOST:PORT or ""), iscsi (HOST:PORT or ""), nbd_unix, api (HOST:PORT), api_token, log_level,
    log_format, default_export, chunklet_size, max_dirty_bytes, webhook_url, first_start_pd_size,
    first_start (bool), pd_allowed_roots (a list, added to the file's)."""
    changes: dict[str, Any] = {}
    for key, value in flags.items():
        if value is None:
            continue
        if key == "data_dir":
            changes["data_dir"] = Path(value).expanduser()
        elif key == "metadata":
            changes["metadata"] = _metadata_url(value, "--metadata")
        elif key == "nbd":
            changes["nbd_listen"] = (
                Listen.parse(value, what="--nbd", default_port=DEFAULT_NBD_PORT) if value.strip() else None
            )
        elif key == "iscsi":
            iscsi_listen = (
                Listen.parse(value, what="--iscsi", default_port=DEFAULT_ISCSI_PORT)
                if value.strip()
                else None
            )
            changes["iscsi"] = replace(changes.get("iscsi", cfg.iscsi), listen=iscsi_listen)
        elif key == "nbd_unix":
            changes["nbd_unix_socket"] = Path(value).expanduser() if value.strip() else None
        elif key == "api":
            changes["api_listen"] = Listen.parse(value, what="--api", default_port=DEFAULT_API_PORT)
        elif key == "api_token":
            changes["api_token"] = value or None
        elif key == "log_level":
            changes["log_level"] = _choice(value, "--log-level", LOG_LEVELS)
        elif key == "log_format":
            changes["log_format"] = _choice(value, "--log-format", LOG_FORMATS)
        elif key == "default_export":
            changes["default_export"] = value or None
        elif key in ("chunklet_size", "max_dirty_bytes"):
            changes[key] = _size(value, "--" + key.replace("_", "-"))
        elif key == "webhook_url":
            changes["webhook"] = replace(cfg.webhook, url=value or None)
        elif key == "pd_allowed_roots":
            changes["pd_allowed_roots"] = (*cfg.pd_allowed_roots, *(Path(r).expanduser() for r in value))
        elif key == "first_start_pd_size":
            fs = changes.get("first_start", cfg.first_start)
            changes["first_start"] = replace(fs, pd_size=_size(value, "--first-start-pd-size"))
        elif key == "first_start":
            fs = changes.get("first_start", cfg.first_start)
            changes["first_start"] = replace(fs, enabled=bool(value))
        elif key in (
            "node_name",
            "partner",
            "mirror_listen",
            "partner_timeout",
            "partner_data",
            "partner_service",
            "partner_metadata",
            "lease_ttl",
            "fence_margin",
            "partner_api",
            "partner_api_token_file",
        ):
            node_cfg = changes.get("node", cfg.node)
            if key == "partner_api":
                node_cfg = replace(node_cfg, partner_api=value.strip().rstrip("/") or None)
            elif key == "partner_api_token_file":
                node_cfg = replace(
                    node_cfg, partner_api_token_file=Path(value).expanduser() if value.strip() else None
                )
            elif key == "partner_metadata":
                node_cfg = replace(node_cfg, partner_metadata=value.strip() or None)
            elif key == "lease_ttl":
                node_cfg = replace(
                    node_cfg, lease_ttl=_float(float(value), "--lease-ttl", low=0.5, high=3600)
                )
            elif key == "fence_margin":
                node_cfg = replace(
                    node_cfg, fence_margin=_float(float(value), "--fence-margin", low=0.05, high=3600)
                )
            elif key == "partner_data":
                node_cfg = replace(node_cfg, partner_data=Path(value).expanduser() if value.strip() else None)
            elif key == "partner_service":
                node_cfg = replace(
                    node_cfg,
                    partner_service=Listen.parse(
                        value, what="--partner-service", default_port=DEFAULT_NBD_PORT
                    )
                    if value.strip()
                    else None,
                )
            elif key == "node_name":
                node_cfg = replace(node_cfg, name=_node_name(value, "--node"))
            elif key == "partner":
                node_cfg = replace(
                    node_cfg,
                    partner=Listen.parse(value, what="--partner", default_port=DEFAULT_MIRROR_PORT)
                    if value.strip()
                    else None,
                )
            elif key == "mirror_listen":
                node_cfg = replace(
                    node_cfg,
                    mirror_listen=Listen.parse(
                        value, what="--mirror-listen", default_port=DEFAULT_MIRROR_PORT
                    ),
                )
            else:
                node_cfg = replace(
                    node_cfg, partner_timeout=_float(float(value), "--partner-timeout", low=0.05, high=600)
                )
            changes["node"] = node_cfg
        else:
            raise ValueError(f"unknown override {key!r}")
    return replace(cfg, **changes)
