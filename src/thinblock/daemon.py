"""``thinblock serve``: one process, one asyncio event loop (uvloop), serving NBD and the REST API.

Start:
  1. configure structured logging (one event per line, logfmt or JSON);
  2. bind the API socket first (a busy port fails in a second, before any store is touched);
  3. open the engine on the data directory (the store is checked; a failed check refuses to start);
  4. on the first start in an empty data directory, create the working default: four sparse
     file PDs, pool ``default`` (RAID 1, region 1 MiB) and a 100 GiB thin volume ``vol0``,
     the default export (the issue's rule; every figure is a ``[first_start]`` key);
  5. start the webhook poster, the NBD server and uvicorn's Server (as a task in this loop,
     its own signal handling disabled), then log where to point qemu-img and nbdinfo.

Stop, on SIGTERM or SIGINT (ours, not uvicorn's): stop accepting on NBD and HTTP, let the
requests in flight finish, flush, ``engine.close()`` (destage, fsync, mark clean), exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config
from .engine import Engine, EngineOptions
from .errors import MetadataCorrupt, NotFound, ThinblockError
from .memory import warm_heap
from .metadata import redact_url, store_kind
from .metadata.lease import holder_name
from .model import AlertKind, CacheMode
from .pdheaders import StoreBehindData
from .units import format_size

log = logging.getLogger("thinblock.daemon")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
FIRST_START_MARKER = "first-start.pending"
SHUTDOWN_GRACE = 10.0  # seconds for in-flight HTTP requests at shutdown


# --- structured logging --------------------------------------------------------------------------

# Attributes every LogRecord has; anything else came in through ``extra=`` and is a field.
_RECORD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message", "taskName"}


def _fields(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRS and not key.startswith("_"):
            yield key, value


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and not any(c in text for c in ' ="\\\n\t') and text.isprintable():
        return text
    return json.dumps(text)


class LogfmtFormatter(logging.Formatter):
    """``ts=2024-05-01T12:00:00.123Z level=info logger=thinblock.daemon event=ready msg="..." key=value``"""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={ts}", f"level={record.levelname.lower()}", f"logger={record.name}"]
        fields = dict(_fields(record))
        event = fields.pop("event", None)
        if event is not None:
            parts.append(f"event={_logfmt_value(event)}")
        parts.append(f"msg={_logfmt_value(record.getMessage())}")
        parts.extend(f"{key}={_logfmt_value(value)}" for key, value in fields.items())
        if record.exc_info:
            parts.append(f"exc={_logfmt_value(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record):
            doc[key] = value if isinstance(value, int | float | bool | str | None) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def setup_logging(level: str, fmt: str = "logfmt", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own start/stop lines and one line per HTTP request are noise at info level.
    for chatty in ("uvicorn.access", "uvicorn.error"):
        logging.getLogger(chatty).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    for noisy in ("httpx", "httpcore", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


# --- first start ---------------------------------------------------------------------------------


def _directory_is_empty(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


async def create_first_start_defaults(engine: Engine, cfg: Config) -> None:
    """The working default of an empty data directory.  Idempotent, so that a first start cut
    short (the marker file is still there) completes on the next start instead of leaving half."""
    fs = cfg.first_start
    data_dir = cfg.data_dir.resolve()
    known_paths = {str(Path(pd.path).resolve()) for pd in engine.list_pds()}
    for i in range(fs.pds):
        path = data_dir / f"pd{i}.img"
        if str(path) in known_paths:
            continue
        pd = await engine.add_pd(path, fs.pd_size, cfg.chunklet_size)
        log.info(
            "first start: added a sparse file PD",
            extra={"event": "first-start-pd", "pd": pd.id, "path": str(path), "size": format_size(pd.size)},
        )
    try:
        engine.get_pool(fs.pool)
    except NotFound:
        await engine.create_pool(
            fs.pool, raid=fs.raid, region_size=fs.region_size, growth_increment=fs.growth_increment
        )
        log.info(
            "first start: created a pool",
            extra={
                "event": "first-start-pool",
                "pool": fs.pool,
                "raid": fs.raid,
                "region_size": format_size(fs.region_size),
            },
        )
    try:
        engine.get_vv(fs.volume)
    except NotFound:
        await engine.create_vv(fs.volume, pool=fs.pool, size=fs.volume_size)
        log.info(
            "first start: created a thin volume",
            extra={
                "event": "first-start-volume",
                "vv": fs.volume,
                "pool": fs.pool,
                "size": format_size(fs.volume_size),
            },
        )


# --- uvicorn inside our loop ---------------------------------------------------------------------


def _uvicorn_server(app: Any, cfg: Config) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # The daemon handles SIGTERM/SIGINT itself, for NBD and the engine as well:
            # uvicorn must neither take them over nor re-raise them when it stops.
            yield

    config = uvicorn.Config(
        app,
        loop="none",
        lifespan="off",
        log_config=None,
        access_log=True,
        server_header=False,
        proxy_headers=False,
        ws="none",
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE),
        ssl_certfile=str(cfg.api_tls_cert) if cfg.api_tls_cert else None,
        ssl_keyfile=str(cfg.api_tls_key) if cfg.api_tls_key else None,
    )
    return Server(config)


def _api_allowed_hosts(cfg: Config, port: int) -> frozenset[str] | None:
    """The ``Host`` values the API accepts (DNS rebinding): its own address with the bound port
    (and localhost's names on loopback) plus ``api.allowed_hosts``; None (any) when it listens on
    every address and no name was configured -- it cannot know the names clients use then."""
    from .api.auth import loopback_hosts

    listen = cfg.api_listen
    hosts: set[str] = set()
    for entry in cfg.api_allowed_hosts:
        hosts.add(entry)
        if not re.search(r":\d+$", entry):  # a name without a port: with the API's port
            hosts.add(f"{entry}:{port}")
    wildcard = listen.host in ("0.0.0.0", "::", "")
    if wildcard and not hosts:
        return None
    if listen.is_loopback or wildcard:
        hosts |= loopback_hosts(port)
    if not wildcard:
        hosts.add(f"{listen.url_host()}:{port}".lower())
    return frozenset(hosts)


def _bind_tcp(host: str, port: int, what: str) -> socket.socket:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise StartupError(f"cannot listen for {what} on {host}:{port}: {reason}") from None
    return sock


def _lease_options(cfg: Config) -> dict[str, Any]:
    """The lease's time to live from ``[node]`` (every daemon holds its node's lease; with
    PostgreSQL its serving gate closes when it is not renewed in time: metadata/lease.py); a node
    of a pair on PostgreSQL also writes only under its lease (fence.py), with the fence's margin.
    Elsewhere no fence."""
    options: dict[str, Any] = {"lease_ttl": cfg.node.lease_ttl}
    if cfg.node.partner is not None and store_kind(cfg.metadata) == "postgresql":
        options["fence_margin"] = cfg.node.fence_margin
    return options


class StartupError(Exception):
    """The daemon cannot start; the message says why, for one clear line in the log."""


class _StoppedWhileRejoined(Exception):
    """Asked to stop while partner-only (rejoined, before this node's lease came back)."""


def _held_by_a_takeover(lease: Any) -> bool:
    """``node:NAME`` is held by the partner's takeover engine (daemon._take_over names itself so),
    and by the local clock not yet expired (the store has the last word: Engine.open asks it)."""
    return str(lease.holder).startswith("takeover by ") and lease.expires_at > time.time()


# --- the daemon ----------------------------------------------------------------------------------


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.stop_requested = asyncio.Event()
        self.stop_signal: str | None = None
        self.engine: Engine | None = None
        self.nbd: Any = None
        self.nbd_access: Any = None  # nbd.access.AccessStore, once NBD is set up
        self.iscsi: Any = None
        self.api_server: Any = None
        self.api_task: asyncio.Task[None] | None = None
        self.api_ctx: Any = None
        self.webhook: Any = None
        self._unsubscribe: Any = None
        self.pair: Any = None  # node.pair.NodePair, with a partner configured
        self.taken_over: list[Any] = []  # node.takeover.TakenOver: the partner's volumes served here
        self._own_copies: Any = None  # rejoined: the copies of this node's volumes its partner sent
        self._partner_store: Any = None  # the partner's PostgreSQL store: its lease, watched
        self._unsubscribe_fence: Any = None
        self.moves: Any = None  # api.moves.PairMoves, with node.partner_api

    def request_stop(self, signame: str) -> None:
        if self.stop_requested.is_set():
            log.warning("already stopping", extra={"event": "signal", "signal": signame})
            return
        self.stop_signal = signame
        log.info("stop requested", extra={"event": "signal", "signal": signame})
        self.stop_requested.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)
        try:
            await self._start()
        except _StoppedWhileRejoined:
            log.info("stopped while rejoined as partner", extra={"event": "rejoin-stopped"})
            return EXIT_OK if await self._stop() else EXIT_FAILURE
        except StartupError as exc:
            log.error("%s", exc, extra={"event": "startup-failed"})
            await self._stop()
            return EXIT_FAILURE
        except StoreBehindData as exc:
            # Not damage `thinblock check` can name in the store alone: say what was found.
            log.error("refusing to start: %s", exc, extra={"event": "startup-failed"})
            await self._stop()
            return EXIT_FAILURE
        except MetadataCorrupt as exc:
            log.error(
                "refusing to start: the metadata store failed its check: %s (run `thinblock check %s`)",
                exc,
                f"--metadata {redact_url(self.cfg.metadata)}"
                if self.cfg.metadata
                else f"--data {self.cfg.data_dir}",
                extra={"event": "startup-failed"},
            )
            await self._stop()
            return EXIT_FAILURE
        except ThinblockError as exc:
            log.error("cannot start: %s", exc, extra={"event": "startup-failed"})
            await self._stop()
            return EXIT_FAILURE
        except Exception:
            log.exception("cannot start", extra={"event": "startup-failed"})
            await self._stop()
            return EXIT_FAILURE

        assert self.api_task is not None
        stop_wait = asyncio.ensure_future(self.stop_requested.wait())
        done, _ = await asyncio.wait({stop_wait, self.api_task}, return_when=asyncio.FIRST_COMPLETED)
        rc = EXIT_OK
        if self.api_task in done and not self.stop_requested.is_set():
            # uvicorn stopped on its own: something is badly wrong; stop everything cleanly.
            failure = self.api_task.exception() if not self.api_task.cancelled() else None
            log.error("the API server stopped unexpectedly: %r", failure, extra={"event": "api-stopped"})
            rc = EXIT_FAILURE
        stop_wait.cancel()
        if not await self._stop():
            rc = EXIT_FAILURE
        return rc

    async def _start(self) -> None:
        cfg = self.cfg
        from .api.app import NodeInfo, create_app
        from .history import History

        api_sock = _bind_tcp(cfg.api_listen.host, cfg.api_listen.port, "the API")
        api_port = api_sock.getsockname()[1]
        try:
            data_dir = cfg.data_dir
            first_start = _directory_is_empty(data_dir) or (data_dir / FIRST_START_MARKER).exists()
            data_dir.mkdir(parents=True, exist_ok=True)
            if first_start and cfg.first_start.enabled:
                (data_dir / FIRST_START_MARKER).touch()
            log.info(
                "opening the engine",
                extra={
                    "event": "engine-opening",
                    "data_dir": str(data_dir.resolve()),
                    "metadata": redact_url(cfg.metadata) if cfg.metadata else "sqlite:",
                    "version": __version__,
                },
            )
            if self._rejoin_possible():
                await self._rejoin_while_taken_over(api_sock)
            self.engine = await Engine.open(data_dir, self._engine_options(), metadata=cfg.metadata)
            engine = self.engine
            if first_start and cfg.first_start.enabled:
                await create_first_start_defaults(engine, cfg)
                (data_dir / FIRST_START_MARKER).unlink(missing_ok=True)
                self._log_first_start_summary()
            if cfg.node.partner is not None:
                await self._start_pair()
                self._unsubscribe_fence = engine.subscribe(self._lease_lost)

            extra_metrics: list[Any] = []
            if self.pair is not None:
                from .node.pair import PairMetrics

                extra_metrics.append(PairMetrics(self._pairs))
            if cfg.webhook.url:
                from .api.webhook import WebhookPoster

                self.webhook = WebhookPoster(
                    cfg.webhook.url,
                    timeout=cfg.webhook.timeout,
                    max_attempts=cfg.webhook.max_attempts,
                    queue_size=cfg.webhook.queue_size,
                )
                self.webhook.start()
                self._unsubscribe = engine.subscribe(self.webhook.submit)
                extra_metrics.append(self.webhook)
                log.info("alerts go to the webhook", extra={"event": "webhook", "url": cfg.webhook.url})

            from .api.metrics import InstrumentedProvider, LatencyRecorder
            from .node.move import VolumeGate

            # The hosts' view of the engine: minus the volumes in a move (node/move.py).  The
            # moves' journals are read before NBD and iSCSI start, so that a volume whose move
            # reached its switch before a crash is never served here again.
            gate = VolumeGate(engine)
            self._access_store()
            self._setup_moves(gate)
            if cfg.latency_histograms:
                latencies = LatencyRecorder(lambda: [vv.name for vv in engine.list_vvs()])
                extra_metrics.append(latencies)
                await self._start_nbd(InstrumentedProvider(gate, latencies))
                await self._start_iscsi(InstrumentedProvider(gate, latencies))
            else:
                await self._start_nbd(gate)
                await self._start_iscsi(gate)

            if self.nbd is not None:
                from .api.metrics import NBDCollector

                extra_metrics.append(NBDCollector(self.nbd.stats))
            if self.iscsi is not None:
                from .api.metrics import ISCSICollector

                iscsi = self.iscsi
                extra_metrics.append(ISCSICollector(iscsi.sessions, iscsi.counters))
            node = NodeInfo(
                iscsi_portal=self.iscsi_portal,
                iscsi_sessions=self.iscsi.sessions if self.iscsi is not None else None,
                nbd_uri=self.nbd_uri,
                nbd_unix_socket=str(cfg.nbd_unix_socket) if cfg.nbd_unix_socket else None,
                nbd_tls=cfg.nbd_tls,
                nbd_exposed_without_tls=self._nbd_exposed_without_tls(),
                nbd_access=self.nbd_access,
                default_export=cfg.default_export,
                iscsi_acl_volumes=tuple(vv for vv, _ in cfg.iscsi.acl),
                data_dir=data_dir.resolve(),
                default_chunklet_size=cfg.chunklet_size,
                pair_status=self._pair_status if self.pair is not None else None,
                moves=self.moves,
                failback=self.failback if self.pair is not None else None,
            )
            security = self._api_security(api_port)
            if not security.token_required:
                log.warning(
                    "the API demands no token: anyone on this host can manage thinblock "
                    "(create one with `thinblock token create NAME --role admin`)",
                    extra={"event": "api-open"},
                )
            history = History(
                engine,
                interval=cfg.history_interval,
                keep=cfg.history_keep,
                horizon=cfg.forecast_horizon,
                alert_window=cfg.forecast_min_window,
            )
            app = create_app(engine, node, security=security, extra_metrics=extra_metrics, history=history)
            self.api_ctx = app.state.ctx
            history.start()
            self.api_server = _uvicorn_server(app, cfg)
        except BaseException:
            api_sock.close()
            raise
        self.api_task = asyncio.create_task(self.api_server.serve(sockets=[api_sock]), name="thinblock-api")
        while not self.api_server.started and not self.api_task.done():
            await asyncio.sleep(0.01)
        if self.api_task.done():
            raise StartupError("the API server failed to start")
        scheme = "https" if cfg.api_tls_cert else "http"
        api_url = f"{scheme}://{cfg.api_listen.url_host()}:{api_port}"
        self._log_ready(api_url)

    def _setup_moves(self, gate: Any) -> None:
        """Planned moves and placement (``node.partner_api``): the partner's API client, this
        node's journals of outgoing and incoming moves, and the recovery of what a crash left."""
        from .node.move import INCOMING_FILE, OUTGOING_FILE, IncomingMoves, MoveJournal, Mover

        node = self.cfg.node
        engine = self.engine
        assert engine is not None
        try:
            outgoing = MoveJournal(self.cfg.data_dir / OUTGOING_FILE)
            incoming = MoveJournal(self.cfg.data_dir / INCOMING_FILE)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        if node.partner_api is None or not node.name:
            if outgoing.records or any(r.state == "incoming" for r in incoming.records.values()):
                raise StartupError(
                    f"this node has volume moves under way ({self.cfg.data_dir / OUTGOING_FILE},"
                    f" {self.cfg.data_dir / INCOMING_FILE}): start it with its node.partner_api to finish them"
                )
            for record in incoming.records.values():
                gate.hidden.discard(record.temp)
            return
        from .api.moves import PairMoves
        from .node.partner_api import PartnerAPI, read_token

        token = None
        if node.partner_api_token_file is not None:
            try:
                token = read_token(node.partner_api_token_file)
            except ValueError as exc:
                raise StartupError(str(exc)) from None
        partner = PartnerAPI(node.partner_api, token)
        iscsi_acl = {vv for vv, _ in self.cfg.iscsi.acl}

        def config_rules(name: str) -> str:
            found = []
            if any(rule.volume == name for rule in self.cfg.nbd_access):
                found.append("[[nbd.access]] rules")
            if name in iscsi_acl:
                found.append("[iscsi.acl] entries")
            return " and ".join(found)

        mover = Mover(
            engine,
            partner,
            outgoing,
            gate,
            node_name=node.name,
            access=self.nbd_access,
            config_rules=config_rules,
        )
        mover.recover()
        self.moves = PairMoves(
            node.name, mover, IncomingMoves(engine, incoming, gate, access=self.nbd_access), partner
        )

    def _engine_options(self) -> EngineOptions:
        cfg = self.cfg
        return EngineOptions(
            max_dirty_bytes=cfg.max_dirty_bytes,
            destage_delay=cfg.destage_delay,
            default_cache_mode=cfg.default_cache_mode,
            io_threads=cfg.io_threads,
            offload_min_bytes=cfg.offload_min,
            pd_check_interval=cfg.pd_check_interval,
            node_name=cfg.node.name,  # the lease node:NAME in the metadata store
            pd_allowed_roots=cfg.pd_allowed_roots,
            pd_direct_io=cfg.pd_direct_io,
            **_lease_options(cfg),
        )

    def _rejoin_possible(self) -> bool:
        """A node of a pair on PostgreSQL: its partner may be serving its volumes (a takeover)."""
        node = self.cfg.node
        return (
            node.partner is not None
            and node.name is not None
            and store_kind(self.cfg.metadata) == "postgresql"
        )

    def _api_security(self, api_port: int) -> Any:
        from .api.auth import ApiSecurity

        cfg = self.cfg
        return ApiSecurity.for_data_dir(
            cfg.data_dir,
            config_token=cfg.api_token,
            require_token=cfg.token_required,
            allowed_hosts=_api_allowed_hosts(cfg, api_port),
        )

    async def _serve_partner_only_api(self, api_sock: socket.socket, lease: Callable[[], Any]) -> Any:
        """The reduced API of a node rejoined as partner only (api/partner_only.py), on a duplicate
        of the API socket: stopping it closes the duplicate, and the full API serves the socket
        once the engine is open."""
        from .api.partner_only import PartnerOnlyInfo, create_partner_only_app
        from .node.pair import PairMetrics

        assert self.pair is not None and self.cfg.node.name is not None

        def lease_fields() -> tuple[str | None, int | None]:
            seen = lease()
            return (seen.holder, seen.epoch) if seen is not None else (None, None)

        info = PartnerOnlyInfo(
            self.cfg.node.name, self.pair.status, lease_fields, metrics=PairMetrics(self._pairs)
        )
        app = create_partner_only_app(info, self._api_security(api_sock.getsockname()[1]))
        server = _uvicorn_server(app, self.cfg)
        task = asyncio.create_task(server.serve(sockets=[api_sock.dup()]), name="thinblock-api-partner-only")
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if task.done():
            raise StartupError("the API server failed to start")
        scheme = "https" if self.cfg.api_tls_cert else "http"
        api_url = f"{scheme}://{self.cfg.api_listen.url_host()}:{api_sock.getsockname()[1]}/api/v1"
        log.info(
            "the API answers status, nodes and health while this node is partner only",
            extra={"event": "api-partner-only", "api": api_url},
        )
        return server, task

    async def _rejoin_while_taken_over(self, api_sock: socket.socket) -> None:
        """The old owner started again after its partner took it over (issue 12 step 5): while the
        partner's takeover holds this node's lease, this node owns nothing.  It rejoins as the
        partner's partner: it holds nothing of its own (its cache died with its last process; its
        volumes' data is on its PDs or was replayed by the partner, which writes them through), it
        listens for the partner's mirror link (the partner's own write-back volumes are mirrored to
        it again once its owner side resyncs) and may take the partner over if it dies.  Returns
        once this node's lease is free again (the partner died and its takeover engine stopped
        renewing it); the caller then opens this node's engine as at any start."""
        from .alerts import AlertBus
        from .metadata.postgres import PostgresStore
        from .node.pair import NodePair

        node, url = self.cfg.node, self.cfg.metadata
        assert node.name is not None and node.partner is not None and url is not None
        try:
            store = await asyncio.to_thread(PostgresStore, url, create=False, max_connections=1)
        except MetadataCorrupt:
            return  # no store yet (Engine.open makes it; nothing to take over) or damaged (it says so)
        try:
            lease = await asyncio.to_thread(store.read_lease, f"node:{node.name}")
            if lease is None or not _held_by_a_takeover(lease):
                return
            log.warning(
                "this node's volumes are served by its partner (%s): rejoining as its partner",
                lease.holder,
                extra={"event": "rejoin-partner", "holder": lease.holder, "epoch": lease.epoch},
            )
            self.pair = NodePair(
                self._pair_config(),
                cache=None,
                flush=None,
                alerts=AlertBus(store),
                take_over=self._take_over if node.partner_data is not None else None,
            )
            await self._start_pair_listener()
            api_server, api_task = await self._serve_partner_only_api(api_sock, lambda: lease)
            try:
                while _held_by_a_takeover(lease) and not self.stop_requested.is_set():
                    stop = asyncio.ensure_future(self.stop_requested.wait())
                    await asyncio.wait({stop}, timeout=max(0.2, node.lease_ttl / 6))
                    stop.cancel()
                    lease = await asyncio.to_thread(store.read_lease, f"node:{node.name}")
                    if lease is None:
                        break
            finally:
                api_server.should_exit = True
                await api_task
            if self.stop_requested.is_set():
                raise _StoppedWhileRejoined()
            # From here the partner's takeover gets no write acknowledged on a copy here: what is
            # held is what _start_pair replays (node/takeover.py).
            self._own_copies = self.pair.freeze_own()
            log.warning(
                "this node's lease is free again: opening its engine",
                extra={
                    "event": "rejoin-owner",
                    "holder": lease.holder if lease is not None else None,
                    "held_writes": len(self._own_copies) if self._own_copies is not None else 0,
                },
            )
        finally:
            store.close()

    def _pair_config(self) -> Any:
        from .node.pair import PairConfig

        node = self.cfg.node
        assert node.partner is not None and node.name
        return PairConfig(
            node.name,
            node.partner.host,
            node.partner.port,
            listen_host=node.mirror_listen.host,
            listen_port=node.mirror_listen.port,
            partner_timeout=node.partner_timeout,
            flush_on_two_copies=node.flush_on_two_copies,
        )

    async def _start_pair_listener(self) -> None:
        assert self.pair is not None
        node = self.cfg.node
        try:
            await self.pair.start()
        except OSError as exc:
            self.pair = None
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise StartupError(
                f"cannot listen for the mirror link on {node.mirror_listen}: {reason}"
            ) from None

    async def _start_pair(self) -> None:
        """The node pair: mirror this node's write-back cache to the partner, hold the partner's."""
        from .node.pair import NodePair
        from .node.takeover import EpochMarks, replay

        node, engine = self.cfg.node, self.engine
        assert node.partner is not None and node.name and engine is not None
        marks = EpochMarks(engine.store)
        died_mirrored = marks.was_valid_at_death()
        own, self._own_copies = self._own_copies, None
        if died_mirrored and own is not None and own.epoch == died_mirrored:
            # Rejoined: the partner served this node's volumes, mirrored here, and is gone (or
            # handed them back while in sync); the copies this process holds are the ones marked
            # valid.  Replayed as a takeover replays them.
            result = await replay(engine, own)
            log.warning(
                "replayed the copies of this node's volumes its partner mirrored here",
                extra={"event": "rejoin-replayed", "replayed": result.replayed, "why": result.reason},
            )
            died_mirrored = marks.was_valid_at_death()
        if died_mirrored:
            # The last process of this node died (kill -9, a crash) while its partner held copies
            # of writes it acknowledged: they may be on no PD of this node.  Serving now would
            # serve older data (issue 12, the restarted owner).  The partner replays them by
            # taking this node over; this node gives up its lease (or, on SQLite, its lock, by
            # exiting) so that the takeover can begin at once.
            if engine.lease is not None:
                await engine.lease.stop(release=True)
                engine.lease = None
            raise StartupError(
                f"node {node.name} stopped without a clean shutdown while its partner held the mirror"
                f" of its write-back cache (epoch {died_mirrored}): the partner must replay those writes"
                " by taking this node's volumes over before this node serves them again"
            )
        writeback_volumes = lambda: sum(  # noqa: E731
            1 for vv in engine.list_vvs() if vv.cache_mode == CacheMode.WRITEBACK
        )
        if self.pair is not None:
            # Rejoined as partner-only while the partner served this node's volumes; they are this
            # node's again: mirror them as at any start.
            self.pair.start_owner(
                cache=engine.cache,
                flush=engine.flush_all,
                alerts=engine.alerts,
                marks=marks,
                writeback_volumes=writeback_volumes,
            )
            return
        self.pair = NodePair(
            self._pair_config(),
            cache=engine.cache,
            flush=engine.flush_all,
            alerts=engine.alerts,
            # The marks are written straight from the loop, ordered before any write-through (on
            # PostgreSQL a round trip that holds the loop; they are written at a session's start
            # and end only).
            marks=marks,
            take_over=self._take_over if node.partner_data is not None else None,
            writeback_volumes=writeback_volumes,
        )
        await self._start_pair_listener()

    async def _take_over(self, holding: Any) -> bool:
        """The partner's engine, once the partner is dead or fenced: replay the copies held of it,
        serve its volumes on its service address.  False while the partner holds its lease (on
        PostgreSQL) or its data directory's lock (on SQLite).  Steps and rules: node/takeover.py."""
        from .errors import Conflict
        from .node.mirror import OwnerMirror
        from .node.mirror_protocol import MirrorHolding
        from .node.takeover import TakenOver, replay

        node = self.cfg.node
        assert node.partner_data is not None and node.partner_service is not None
        started = time.monotonic()
        options = self._engine_options()
        owner = holding.owner if holding is not None else None
        if node.partner_metadata is not None:
            if not owner or owner == "-":
                return False  # the partner never said who it is: nothing to take over
            holder = f"takeover by {node.name} ({holder_name(self.cfg.data_dir)})"
            if not await self._partner_lease_free(owner, holder):
                return False
            # Ours now, with epoch + 1: the old owner stopped writing before its lease expired
            # (fence.py), and its mirror links are refused from here on.
            assert self.pair is not None
            self.pair.refuse_owner(owner)
            options = replace(options, node_name=owner, lease_holder=holder, lock_files=False)
        try:
            engine = await Engine.open(node.partner_data, options, metadata=node.partner_metadata)
        except Conflict:
            return False  # the partner lives (it holds its lock, or its lease)
        log.warning(
            "the partner is dead: taking over its volumes",
            extra={
                "event": "takeover-start",
                "data_dir": str(node.partner_data),
                "epoch": engine.lease.lease.epoch if engine.lease is not None else 0,
            },
        )
        # No partner is left to mirror to: its write-back volumes are written through from now.
        engine.cache.mirror = OwnerMirror(f"{node.name}-takeover", 0, durable=engine.flush_all)
        try:
            result = await replay(engine, holding if holding is not None else MirrorHolding("-"))
            log.warning(
                "replayed the partner's mirrored writes",
                extra={
                    "event": "takeover-replayed",
                    "seconds": round(time.monotonic() - started, 3),
                    "replayed": result.replayed,
                    "epoch": engine.lease.lease.epoch if engine.lease is not None else 0,
                },
            )
            mirror = await self._mirror_taken_over(engine, owner) if node.partner_metadata else None
            try:
                server = await self._bind_service(engine)
            except BaseException:
                if mirror is not None:
                    await mirror.stop()
                raise
        except BaseException:
            await engine.close()
            raise
        assert owner is not None or mirror is None
        self.taken_over.append(TakenOver(owner or "?", engine, server, mirror))
        log.warning(
            "took over the partner's volumes",
            extra={
                "event": "takeover-done",
                "seconds": round(time.monotonic() - started, 3),
                "replayed": result.replayed,
                "replayed_bytes": result.replayed_bytes,
                "discarded": result.discarded,
                "why": result.reason,
                "nbd": f"nbd://{node.partner_service.url_host()}:{server.port}",
                "volumes": ",".join(engine.export_names()),
            },
        )
        return True

    async def _mirror_taken_over(self, engine: Engine, owner: str | None) -> Any:
        """The taken-over volumes are mirrored to their old owner once it rejoins as partner
        (node/takeover.py): under its name, with its store's epoch marks; written through (and
        the mirror-degraded alert raised on this node) until it is back and in sync."""
        from .node.pair import NodePair
        from .node.takeover import EpochMarks

        assert owner is not None and owner != "-"
        alerts = self.engine.alerts if self.engine is not None else engine.alerts
        mirror = NodePair(
            replace(self._pair_config(), node=owner, to_old_owner=True),
            cache=engine.cache,
            flush=engine.flush_all,
            alerts=alerts,
            marks=EpochMarks(engine.store),
            writeback_volumes=lambda: sum(
                1 for vv in engine.list_vvs() if vv.cache_mode == CacheMode.WRITEBACK
            ),
        )
        await mirror.start(listen_for_partner=False)
        return mirror

    def _pairs(self) -> list[Any]:
        """Every mirror of this daemon: its own pair's, and those of the volumes it took over."""
        pairs = [self.pair] if self.pair is not None else []
        return pairs + [t.mirror for t in self.taken_over if t.mirror is not None]

    def _pair_status(self) -> Any:
        assert self.pair is not None
        status = self.pair.status()
        if self.taken_over:
            states = {t.mirror_state() for t in self.taken_over}
            status = replace(status, taken_over_mirror=states.pop() if len(states) == 1 else "mixed")
        return status

    async def failback(self) -> list[str]:
        """Hand the volumes this node took over back to their owner (``thinblock node failback``):
        refused (node.takeover.FailbackRefused) unless the owner rejoined and is in sync."""
        from .node.takeover import fail_back

        assert self.pair is not None
        return await fail_back(self.taken_over, self.pair)

    async def _bind_service(self, engine: Engine) -> Any:
        """Serve the taken-over volumes on the partner's service address.  A partner that was
        paused still has it bound: it lets it go when it runs again and finds its lease lost
        (``_lease_lost``); until then, try again (on one machine nothing else can move the
        address; in production a floating address is moved by the cluster manager)."""
        from .nbd.server import NBDServer

        service = self.cfg.node.partner_service
        assert service is not None
        waited = False
        while True:
            server = NBDServer(engine, default_export=None, sessions=engine.sessions)
            try:
                await server.start(host=service.host, port=service.port)
                return server
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
            if not waited:
                waited = True
                log.warning(
                    "the partner's service address %s is still bound by the old owner: waiting for it",
                    service,
                    extra={"event": "takeover-service-busy"},
                )
            await asyncio.sleep(0.2)

    def _lease_lost(self, alert: Any) -> None:
        """This node's lease was taken (a partner took it over while this process was paused or
        cut off): it is fenced (no PD or store write); stop serving, so that its NBD clients get
        errors at once and the service address is free for the new owner."""
        if alert.kind != AlertKind.LEASE_LOST or self.nbd is None or self.cfg.node.partner is None:
            return
        nbd, self.nbd = self.nbd, None
        log.error(
            "fenced: this node's volumes are served by its partner now; NBD stopped",
            extra={"event": "fenced"},
        )
        asyncio.get_running_loop().create_task(nbd.stop(), name="nbd-stop-fenced")

    async def _partner_lease_free(self, owner: str, holder: str) -> bool:
        """Take the partner's lease node:OWNER in its store by compare-and-set (None while the
        partner holds it unexpired); the takeover's engine then takes it again as the same
        holder, keeping the epoch."""
        from .metadata.postgres import PostgresStore

        url = self.cfg.node.partner_metadata
        assert url is not None
        if self._partner_store is None:
            self._partner_store = await asyncio.to_thread(PostgresStore, url, create=False, max_connections=1)
        store = self._partner_store
        lease = await asyncio.to_thread(store.acquire_lease, f"node:{owner}", holder, self.cfg.node.lease_ttl)
        return lease is not None

    async def _start_nbd(self, provider: Any) -> None:
        cfg = self.cfg
        try:
            from .nbd.server import NBDServer
        except ImportError as exc:
            raise StartupError(f"the NBD front end is not available: {exc}") from None
        default_export = cfg.default_export
        if default_export is not None:
            assert self.engine is not None
            try:
                self.engine.get_vv(default_export)
            except NotFound:
                log.warning(
                    "the default export does not exist (yet): clients must name a volume",
                    extra={"event": "default-export-missing", "vv": default_export},
                )
        assert self.engine is not None
        from .nbd.protocol import TLSMode
        from .nbd.tls import TLSSettings, server_context

        tls_mode = TLSMode(cfg.nbd_tls)
        tls_context = None
        psk_keys = None
        if tls_mode is not TLSMode.OFF and cfg.nbd_tls_psk_file is not None:
            from .nbd.psk import PSKError, load_keys, psk_support

            why_not = psk_support()
            if why_not is not None:
                raise StartupError(f"cannot set up TLS-PSK for NBD: {why_not}")
            try:
                psk_keys = load_keys(cfg.nbd_tls_psk_file)
            except PSKError as exc:
                raise StartupError(f"cannot set up TLS-PSK for NBD: {exc}") from None
        elif tls_mode is not TLSMode.OFF:
            settings = TLSSettings(tls_mode, cfg.nbd_tls_cert, cfg.nbd_tls_key, cfg.nbd_tls_ca)
            try:
                tls_context = server_context(settings)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise StartupError(f"cannot set up TLS for NBD: {exc}") from None
        if self._nbd_exposed_without_tls():
            log.warning(
                "NBD listens on %s without required TLS: anyone who reaches it can read and write "
                'every volume (set nbd.tls = "required" with a certificate, or listen on loopback)',
                cfg.nbd_listen,
                extra={"event": "nbd-exposed", "tls": cfg.nbd_tls},
            )
        self.nbd = NBDServer(
            provider,
            default_export=default_export,
            sessions=self.engine.sessions,
            tls_mode=tls_mode,
            tls_context=tls_context,
            psk_keys=psk_keys,
            access=self._access_store(),
            max_connections=cfg.nbd_max_connections,
            max_connections_per_client=cfg.nbd_max_connections_per_client,
            handshake_timeout=cfg.nbd_handshake_timeout,
            idle_timeout=cfg.nbd_idle_timeout,
            idle_exempt=cfg.nbd_idle_exempt,
            max_bytes_in_flight=cfg.nbd_max_bytes_in_flight,
        )
        host = cfg.nbd_listen.host if cfg.nbd_listen else None
        port = cfg.nbd_listen.port if cfg.nbd_listen else None
        unix_path = str(cfg.nbd_unix_socket) if cfg.nbd_unix_socket else None
        try:
            await self.nbd.start(host=host, port=port, unix_path=unix_path)
        except OSError as exc:
            self.nbd = None
            where = " and ".join(w for w in (cfg.nbd_listen and str(cfg.nbd_listen), unix_path) if w)
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise StartupError(f"cannot listen for NBD on {where}: {reason}") from None

    def _access_store(self) -> Any:
        """The NBD access rules: the configuration's and those made through the API, kept in the
        data directory; a file that cannot be read stops the start (serving without its rules
        would open what they close)."""
        from .nbd.access import ACCESS_FILE, AccessStore

        if self.nbd_access is not None:
            return self.nbd_access  # one store: the moves carry its rules, NBD enforces them
        try:
            self.nbd_access = AccessStore(self.cfg.data_dir / ACCESS_FILE, fixed=self.cfg.nbd_access)
        except RuntimeError as exc:
            raise StartupError(str(exc)) from None
        return self.nbd_access

    async def _start_iscsi(self, provider: Any) -> None:
        """The iSCSI target, when ``iscsi.listen`` (or ``--iscsi``) asks for it."""
        icfg = self.cfg.iscsi
        if icfg.listen is None:
            return
        from .iscsi.negotiation import ChapCredentials
        from .iscsi.server import AccessRule, ISCSIServer

        assert self.engine is not None
        chap = None
        if icfg.chap_user and icfg.chap_secret:
            chap = ChapCredentials(icfg.chap_user, icfg.chap_secret, icfg.mutual_user, icfg.mutual_secret)
        self.iscsi = ISCSIServer(
            provider,
            node_name=icfg.node_name,
            chap=chap,
            acl=[AccessRule(vv, names) for vv, names in icfg.acl],
            login_timeout=icfg.login_timeout,
            nop_interval=icfg.nop_interval,
            nop_timeout=icfg.nop_timeout,
            max_connections=icfg.max_connections,
            max_connections_per_client=icfg.max_connections_per_client,
            sessions=self.engine.sessions,
        )
        try:
            await self.iscsi.start(icfg.listen.host, icfg.listen.port)
        except OSError as exc:
            self.iscsi = None
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            raise StartupError(f"cannot listen for iSCSI on {icfg.listen}: {reason}") from None

    @property
    def iscsi_portal(self) -> str | None:
        """HOST:PORT of the iSCSI target with the port really bound, or None when off."""
        icfg = self.cfg.iscsi
        if icfg.listen is None or self.iscsi is None or self.iscsi.port is None:
            return None
        return f"{icfg.listen.url_host()}:{self.iscsi.port}"

    def _log_first_start_summary(self) -> None:
        fs = self.cfg.first_start
        log.info(
            f"first start: created {fs.pds} sparse file PDs of {format_size(fs.pd_size)} in "
            f"{self.cfg.data_dir.resolve()}, pool {fs.pool!r} (RAID {fs.raid}, region "
            f"{format_size(fs.region_size)}) and thin volume {fs.volume!r} ({format_size(fs.volume_size)})",
            extra={"event": "first-start"},
        )

    def _nbd_exposed_without_tls(self) -> bool:
        """NBD on a TCP address beyond loopback without required TLS: anyone who can reach the
        port reads and writes the volumes (and sees them listed)."""
        cfg = self.cfg
        return cfg.nbd_listen is not None and not cfg.nbd_listen.is_loopback and cfg.nbd_tls != "required"

    @property
    def nbd_uri(self) -> str | None:
        """nbd://HOST:PORT with the port really bound (the config may say 0: any free port)."""
        cfg = self.cfg
        if cfg.nbd_listen is None or self.nbd is None or self.nbd.port is None:
            return None
        scheme = "nbds" if cfg.nbd_tls == "required" else "nbd"
        return f"{scheme}://{cfg.nbd_listen.url_host()}:{self.nbd.port}"

    def _log_ready(self, api_url: str) -> None:
        cfg = self.cfg
        nbd_uri = self.nbd_uri
        fields: dict[str, Any] = {"event": "ready", "api": f"{api_url}/api/v1", "pid": os.getpid()}
        if nbd_uri:
            fields["nbd"] = nbd_uri
        if self.iscsi_portal:
            fields["iscsi"] = self.iscsi_portal
        if cfg.nbd_unix_socket:
            fields["nbd_unix"] = str(cfg.nbd_unix_socket)
        if cfg.default_export and self.engine is not None:
            try:
                self.engine.get_vv(cfg.default_export)
                fields["default_export"] = cfg.default_export
            except NotFound:
                pass  # said at start (default-export-missing); the hints below name no missing volume
        if self.pair is not None:
            fields["node"] = cfg.node.name
            fields["mirror"] = f"{cfg.node.mirror_listen.url_host()}:{self.pair.listen_port}"
            fields["partner"] = str(cfg.node.partner)
        log.info("thinblock is serving", extra=fields)
        assert self.engine is not None
        names = [vv.name for vv in self.engine.list_vvs()]
        # The hints name a volume that exists: the default export, unless it was deleted.
        export = cfg.default_export if cfg.default_export in names else (names[0] if names else None)
        if export is not None:
            if nbd_uri:
                target = f"{nbd_uri}/{export}"
            else:
                target = f"nbd+unix:///{export}?socket={cfg.nbd_unix_socket}"
            for hint in (
                f"nbdinfo {target}",
                f"qemu-img info {target}",
                f"qemu-io -f raw -c 'write -P 0xab 0 1M' {target}",
            ):
                log.info(hint, extra={"event": "hint", "vv": export})
        if self.iscsi_portal and self.iscsi is not None and export is not None:
            lun = f"iscsi://{self.iscsi_portal}/{self.iscsi.target_name(export)}/0"
            for hint in (f"iscsi-ls -s iscsi://{self.iscsi_portal}", f"qemu-img info {lun}"):
                log.info(hint, extra={"event": "hint", "vv": export})
        api_hint = "" if api_url == "http://127.0.0.1:8080" else f" --api {api_url}"
        log.info(f"thinblock{api_hint} vv list", extra={"event": "hint"})

    async def _stop(self) -> bool:
        """Stop accepting, finish in-flight requests, flush, close the engine.  True when clean."""
        clean = True
        started = time.monotonic()
        if self.api_server is not None:
            self.api_server.should_exit = True
        if self.iscsi is not None:
            try:
                await self.iscsi.stop()
            except Exception:
                clean = False
                log.exception("stopping the iSCSI target failed", extra={"event": "iscsi-stop-failed"})
        if self.nbd is not None:
            try:
                await self.nbd.stop()
            except Exception:
                clean = False
                log.exception("stopping the NBD server failed", extra={"event": "nbd-stop-failed"})
        if self.api_task is not None:
            try:
                await self.api_task
            except BaseException:
                log.exception("the API server failed while stopping", extra={"event": "api-stop-failed"})
        if self.api_ctx is not None:
            await self.api_ctx.aclose()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self.webhook is not None:
            await self.webhook.stop(drain_timeout=2.0)
        if self.moves is not None:
            await self.moves.mover.aclose()  # a move under way is settled at the next start
            if self.moves.partner is not None:
                await self.moves.partner.aclose()
        if self.pair is not None:
            try:
                await self.pair.stop()  # the cache writes through from here; the engine destages it
            except Exception:
                clean = False
                log.exception("stopping the node pair failed", extra={"event": "pair-stop-failed"})
        for taken in self.taken_over:
            try:
                await taken.close()
            except Exception:
                clean = False
                log.exception("closing a taken-over engine failed", extra={"event": "takeover-close-failed"})
        if self._partner_store is not None:
            self._partner_store.close()
        if self.engine is not None:
            try:
                await self.engine.close()
            except Exception:
                clean = False
                log.exception("closing the engine failed", extra={"event": "engine-close-failed"})
            else:
                log.info(
                    "engine flushed and closed",
                    extra={"event": "engine-closed", "seconds": round(time.monotonic() - started, 3)},
                )
        log.info("stopped", extra={"event": "stopped", "clean": clean})
        return clean


def serve(cfg: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; the process exit code."""
    setup_logging(cfg.log_level, cfg.log_format)
    warm_heap()  # large request buffers reuse mapped pages instead of faulting (memory.py)
    if cfg.event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            log.warning(
                "uvloop is not installed: using the standard event loop", extra={"event": "no-uvloop"}
            )
        else:
            return uvloop.run(Daemon(cfg).run())
    return asyncio.run(Daemon(cfg).run())
