"""The daemon's TOML configuration and the flags that override it (thinblock.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from thinblock.config import Config, ConfigError, Listen, apply_overrides, load_config, parse_config
from thinblock.model import CacheMode
from thinblock.units import GiB, MiB


def test_defaults_are_the_documented_ones() -> None:
    cfg = load_config(None)
    assert cfg.data_dir == Path("./thinblock-data")
    assert cfg.nbd_listen == Listen("127.0.0.1", 10809)
    assert cfg.api_listen == Listen("127.0.0.1", 8080)
    assert cfg.nbd_unix_socket is None
    assert cfg.default_export == "vol0"
    assert cfg.api_token is None and not cfg.token_required
    assert cfg.latency_histograms is True
    fs = cfg.first_start
    assert (fs.enabled, fs.pds, fs.pd_size, fs.pool, fs.raid, fs.region_size) == (
        True,
        4,
        64 * GiB,
        "default",
        1,
        MiB,
    )
    assert (fs.volume, fs.volume_size) == ("vol0", 100 * GiB)
    assert cfg.validate() is cfg


def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "thinblock.toml"
    path.parent.mkdir()
    path.write_text(
        """
data_dir = "data"
log_level = "debug"
log_format = "json"

[nbd]
listen = "127.0.0.1:11000"
unix_socket = "/run/tb.sock"
default_export = ""

[api]
listen = "[::1]:9000"
token = "s3cret"

[engine]
chunklet_size = "4MiB"
max_dirty_bytes = 1048576
destage_delay = 0
default_cache_mode = "writeback"
io_threads = 2
offload_min = "64KiB"

[webhook]
url = "http://127.0.0.1:9999/hook"
timeout = 1.5
max_attempts = 3
queue_size = 10

[metrics]
latency_histograms = false

[first_start]
pds = 3
pd_size = "64MiB"
raid = 5
growth_increment = "8M"
volume = "disk"
volume_size = "1G"
"""
    )
    cfg = load_config(path)
    assert cfg.data_dir == path.parent / "data"  # relative to the config file, not the cwd
    assert (cfg.log_level, cfg.log_format) == ("debug", "json")
    assert cfg.nbd_listen == Listen("127.0.0.1", 11000)
    assert cfg.nbd_unix_socket == Path("/run/tb.sock")
    assert cfg.default_export is None
    assert cfg.api_listen == Listen("::1", 9000) and cfg.api_listen.is_loopback
    assert cfg.api_token == "s3cret" and cfg.token_required  # a configured token is enforced
    assert (cfg.chunklet_size, cfg.max_dirty_bytes, cfg.destage_delay) == (4 * MiB, MiB, 0.0)
    assert cfg.default_cache_mode == CacheMode.WRITEBACK
    assert (cfg.io_threads, cfg.offload_min) == (2, 64 * 1024)
    assert cfg.webhook.url == "http://127.0.0.1:9999/hook"
    assert (cfg.webhook.timeout, cfg.webhook.max_attempts, cfg.webhook.queue_size) == (1.5, 3, 10)
    assert cfg.latency_histograms is False
    fs = cfg.first_start
    assert (fs.pds, fs.pd_size, fs.raid, fs.growth_increment, fs.volume, fs.volume_size) == (
        3,
        64 * MiB,
        5,
        8 * MiB,
        "disk",
        GiB,
    )
    assert fs.pool == "default"  # untouched keys keep their defaults
    cfg.validate()


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"data_dri": "x"}, "unknown key: data_dri"),
        ({"nbd": {"port": 1}}, "unknown key in [nbd]: port"),
        ({"nbd": "x"}, "[nbd] must be a table"),
        ({"log_level": "loud"}, "log_level: expected one of"),
        ({"engine": {"chunklet_size": "big"}}, "engine.chunklet_size: not a size"),
        ({"engine": {"chunklet_size": 0}}, "engine.chunklet_size: must be greater than zero"),
        ({"engine": {"max_dirty_bytes": True}}, "engine.max_dirty_bytes: expected a size"),
        ({"engine": {"default_cache_mode": "fast"}}, "engine.default_cache_mode"),
        ({"api": {"listen": "127.0.0.1:99999"}}, "api.listen: port out of range"),
        ({"api": {"listen": "127.0.0.1:http"}}, "api.listen: not a port number"),
        ({"api": {"listen": "::1:8080"}}, "write IPv6 addresses as [ADDR]:PORT"),
        ({"api": {"require_token": "yes"}}, "api.require_token: expected true or false"),
        ({"webhook": {"url": "ftp://x"}}, "webhook.url: expected an http"),
        ({"webhook": {"max_attempts": 0}}, "webhook.max_attempts: must be between"),
        ({"first_start": {"pds": "4"}}, "first_start.pds: expected an integer"),
        ({"first_start": {"pd_size": "1 zillion"}}, "first_start.pd_size: not a size"),
    ],
)
def test_mistakes_name_the_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_config(doc)
    assert message in str(info.value)


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("data_dir = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    path.write_text("[api]\nlisten = 5\n")
    with pytest.raises(ConfigError, match=r"bad.toml: api.listen: expected a string"):
        load_config(path)


def test_flags_override_the_file() -> None:
    cfg = parse_config({"data_dir": "/srv/a", "api": {"listen": "127.0.0.1:1"}, "log_level": "error"})
    cfg = apply_overrides(
        cfg,
        data_dir="/srv/b",
        nbd="127.0.0.1:0",
        nbd_unix="/tmp/x.sock",
        api="127.0.0.1:2",
        log_level="debug",
        chunklet_size="1MiB",
        max_dirty_bytes="2MiB",
        webhook_url="http://127.0.0.1:3/",
        first_start_pd_size="32MiB",
        default_export="",
        log_format=None,  # not given: the file's (default) stays
    )
    assert cfg.data_dir == Path("/srv/b")
    assert cfg.nbd_listen == Listen("127.0.0.1", 0)
    assert cfg.nbd_unix_socket == Path("/tmp/x.sock")
    assert cfg.api_listen == Listen("127.0.0.1", 2)
    assert cfg.log_level == "debug" and cfg.log_format == "logfmt"
    assert (cfg.chunklet_size, cfg.max_dirty_bytes) == (MiB, 2 * MiB)
    assert cfg.webhook.url == "http://127.0.0.1:3/"
    assert cfg.first_start.pd_size == 32 * MiB
    assert cfg.default_export is None
    assert apply_overrides(cfg, first_start=False).first_start.enabled is False
    with pytest.raises(ConfigError, match="--api: not a port number"):
        apply_overrides(cfg, api="127.0.0.1:x")


@pytest.mark.parametrize(
    ("text", "listen", "loopback"),
    [
        ("127.0.0.1:8080", Listen("127.0.0.1", 8080), True),
        ("127.0.0.2:8080", Listen("127.0.0.2", 8080), True),
        ("localhost", Listen("localhost", 8080), True),
        (":9000", Listen("127.0.0.1", 9000), True),
        ("[::1]:80", Listen("::1", 80), True),
        ("[::]:80", Listen("::", 80), False),
        ("0.0.0.0:8080", Listen("0.0.0.0", 8080), False),
        ("10.1.2.3", Listen("10.1.2.3", 8080), False),
        ("storage1.example:8080", Listen("storage1.example", 8080), False),
    ],
)
def test_listen_addresses(text: str, listen: Listen, loopback: bool) -> None:
    parsed = Listen.parse(text, what="api.listen", default_port=8080)
    assert parsed == listen
    assert parsed.is_loopback is loopback


def test_token_required_off_loopback() -> None:
    """The issue's rule: bound elsewhere than loopback, the API requires a token.  The daemon
    refuses to start open to the network rather than serve without one."""
    cfg = apply_overrides(Config(), api="0.0.0.0:8080")
    assert cfg.token_required
    with pytest.raises(ConfigError, match=r"off loopback.*set api\.token"):
        cfg.validate()
    assert apply_overrides(cfg, api_token="t").validate().api_token == "t"


def test_require_token_on_loopback_needs_a_token() -> None:
    cfg = parse_config({"api": {"require_token": True}})
    assert cfg.token_required
    with pytest.raises(ConfigError, match="require_token"):
        cfg.validate()


def test_nbd_must_listen_somewhere() -> None:
    with pytest.raises(ConfigError, match="NBD has nowhere to listen"):
        parse_config({"nbd": {"listen": ""}}).validate()
    cfg = parse_config({"nbd": {"listen": "", "unix_socket": "/tmp/s"}}).validate()
    assert cfg.nbd_listen is None and cfg.nbd_unix_socket == Path("/tmp/s")


def test_node_pair_table_and_flags() -> None:
    cfg = parse_config(
        {
            "node": {
                "name": "n1",
                "partner": "127.0.0.2:7000",
                "mirror_listen": "127.0.0.1",
                "partner_timeout": 0.5,
            }
        }
    ).validate()
    assert cfg.node.name == "n1"
    assert cfg.node.partner == Listen("127.0.0.2", 7000)
    assert cfg.node.mirror_listen == Listen("127.0.0.1", 10810)  # the default mirror port
    assert cfg.node.partner_timeout == 0.5
    cfg = apply_overrides(
        cfg, node_name="n9", partner="127.0.0.3:1", mirror_listen="127.0.0.1:0", partner_timeout="2"
    )
    assert (cfg.node.name, cfg.node.partner, cfg.node.mirror_listen, cfg.node.partner_timeout) == (
        "n9",
        Listen("127.0.0.3", 1),
        Listen("127.0.0.1", 0),
        2.0,
    )
    assert Config().node.partner is None  # no partner: a single node, as before


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"node": {"partner": "127.0.0.1:1"}}, "give this node a name"),
        ({"node": {"name": " n1"}}, "node.name: a node name is"),
        ({"node": {"partner_timeout": 0}}, "node.partner_timeout: must be between"),
        ({"node": {"peer": "x"}}, "unknown key in [node]: peer"),
    ],
)
def test_node_pair_mistakes_name_the_key(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc).validate()
    assert message in str(info.value)


def test_pd_allowed_roots_and_api_tls(tmp_path: Path) -> None:
    cfg = parse_config(
        {
            "engine": {"pd_allowed_roots": ["disks", "/srv/pds"]},
            "api": {"tls_cert": "c.pem", "tls_key": "k.pem", "allowed_hosts": ["Thinblock.example"]},
        },
        base_dir=tmp_path,
    )
    assert cfg.pd_allowed_roots == (tmp_path / "disks", Path("/srv/pds"))
    assert (cfg.api_tls_cert, cfg.api_tls_key) == (tmp_path / "c.pem", tmp_path / "k.pem")
    assert cfg.api_allowed_hosts == ("thinblock.example",)
    assert apply_overrides(cfg, pd_allowed_roots=["/more"]).pd_allowed_roots[-1] == Path("/more")
    with pytest.raises(ConfigError, match="pd_allowed_roots: expected a list"):
        parse_config({"engine": {"pd_allowed_roots": "/srv"}})
    with pytest.raises(ConfigError, match="go together"):
        parse_config({"api": {"tls_cert": "c.pem"}}).validate()


def test_nbd_tls_settings(tmp_path: Path) -> None:
    cfg = parse_config(
        {"nbd": {"tls": "Required", "tls_cert": "s.pem", "tls_key": "k.pem", "tls_ca": "ca.pem"}},
        base_dir=tmp_path,
    ).validate()
    assert (cfg.nbd_tls, cfg.nbd_tls_cert, cfg.nbd_tls_ca) == (
        "required",
        tmp_path / "s.pem",
        tmp_path / "ca.pem",
    )
    with pytest.raises(ConfigError, match=r"needs nbd\.tls_cert and nbd\.tls_key"):
        parse_config({"nbd": {"tls": "allowed"}}).validate()
    with pytest.raises(ConfigError, match=r"nbd\.tls: expected one of off, allowed, required"):
        parse_config({"nbd": {"tls": "yes"}})


def test_nbd_tls_psk_settings(tmp_path: Path) -> None:
    cfg = parse_config({"nbd": {"tls": "required", "tls_psk_file": "keys.psk"}}, base_dir=tmp_path).validate()
    assert cfg.nbd_tls_psk_file == tmp_path / "keys.psk" and cfg.nbd_tls_cert is None
    with pytest.raises(ConfigError, match=r"nbd\.tls_psk_file is set but nbd\.tls is off"):
        parse_config({"nbd": {"tls_psk_file": "keys.psk"}}).validate()
    with pytest.raises(ConfigError, match=r"with PSK or with X\.509, not both"):
        parse_config(
            {"nbd": {"tls": "allowed", "tls_psk_file": "k", "tls_cert": "c.pem", "tls_key": "k.pem"}}
        ).validate()


def test_nbd_connection_limits_and_timeouts() -> None:
    default = Config()
    assert (default.nbd_max_connections, default.nbd_max_connections_per_client) == (256, 128)
    assert (default.nbd_idle_timeout, default.nbd_handshake_timeout) == (300.0, 30.0)
    cfg = parse_config(
        {
            "nbd": {
                "max_connections": 100,
                "max_connections_per_client": 0,
                "idle_timeout": 0,
                "handshake_timeout": 5,
                "max_bytes_in_flight": "256MiB",
            }
        }
    ).validate()
    assert (cfg.nbd_max_connections, cfg.nbd_max_connections_per_client) == (100, 0)
    assert (cfg.nbd_idle_timeout, cfg.nbd_handshake_timeout, cfg.nbd_max_bytes_in_flight) == (
        0.0,
        5.0,
        256 * MiB,
    )
    with pytest.raises(ConfigError, match=r"nbd\.max_connections: must be between 1"):
        parse_config({"nbd": {"max_connections": 0}})
    with pytest.raises(ConfigError, match=r"nbd\.idle_timeout: must be between 0"):
        parse_config({"nbd": {"idle_timeout": -1}})
    exempt = parse_config({"nbd": {"idle_exempt": ["10.0.0.0/8", "psk:backup", "unix"]}})
    assert exempt.nbd_idle_exempt == ("10.0.0.0/8", "psk:backup", "unix")
    with pytest.raises(ConfigError, match=r"nbd\.idle_exempt: not a client"):
        parse_config({"nbd": {"idle_exempt": ["backup-host"]}})


def test_takeover_needs_the_partners_directory_and_service_address(tmp_path: Path) -> None:
    doc = {
        "node": {
            "name": "n2",
            "partner": "127.0.0.1:1",
            "partner_data": "n1-data",
            "partner_service": "127.0.1.1:10809",
        }
    }
    cfg = parse_config(doc, base_dir=tmp_path).validate()
    assert cfg.node.partner_data == tmp_path / "n1-data"  # relative to the file, as every path
    assert cfg.node.partner_service == Listen("127.0.1.1", 10809)
    half = {"node": {"name": "n2", "partner": "127.0.0.1:1", "partner_data": "x"}}
    with pytest.raises(ConfigError, match=r"both node\.partner_data and node\.partner_service"):
        parse_config(half).validate()
    cfg = apply_overrides(
        Config(), node_name="n2", partner="127.0.0.1:1", partner_data="/d", partner_service="127.0.1.1:9"
    )
    assert (cfg.node.partner_data, cfg.node.partner_service) == (Path("/d"), Listen("127.0.1.1", 9))


def test_the_partners_api_for_moves_needs_a_partner_and_a_url(tmp_path: Path) -> None:
    doc = {
        "node": {
            "name": "n1",
            "partner": "127.0.0.1:1",
            "partner_api": "http://127.0.0.1:8081/",
            "partner_api_token_file": "n2.token",
        }
    }
    cfg = parse_config(doc, base_dir=tmp_path).validate()
    assert cfg.node.partner_api == "http://127.0.0.1:8081"
    assert cfg.node.partner_api_token_file == tmp_path / "n2.token"
    with pytest.raises(ConfigError, match=r"node\.partner_api is set without node\.partner"):
        parse_config({"node": {"name": "n1", "partner_api": "http://127.0.0.1:8081"}}).validate()
    for bad in ("127.0.0.1:8081", "ftp://h:1", "http://h:1/api/v1"):
        with pytest.raises(ConfigError, match=r"node\.partner_api must be the partner's API"):
            parse_config({"node": {**doc["node"], "partner_api": bad}}, base_dir=tmp_path).validate()
    no_api = {"name": "n1", "partner": "127.0.0.1:1", "partner_api_token_file": "t"}
    with pytest.raises(ConfigError, match=r"partner_api_token_file is set without node\.partner_api"):
        parse_config({"node": no_api}, base_dir=tmp_path).validate()
    cfg = apply_overrides(
        Config(),
        node_name="n1",
        partner="127.0.0.1:1",
        partner_api="https://n2:8081",
        partner_api_token_file="/t",
    ).validate()
    assert (cfg.node.partner_api, cfg.node.partner_api_token_file) == ("https://n2:8081", Path("/t"))


def test_iscsi_connection_limits() -> None:
    default = Config()
    assert (default.iscsi.max_connections, default.iscsi.max_connections_per_client) == (256, 128)
    cfg = parse_config({"iscsi": {"max_connections": 64, "max_connections_per_client": 0}}).validate()
    assert (cfg.iscsi.max_connections, cfg.iscsi.max_connections_per_client) == (64, 0)
    with pytest.raises(ConfigError, match=r"iscsi\.max_connections: must be between 1"):
        parse_config({"iscsi": {"max_connections": 0}})
    with pytest.raises(ConfigError, match=r"iscsi\.max_connections_per_client: must be between 0"):
        parse_config({"iscsi": {"max_connections_per_client": -1}})
