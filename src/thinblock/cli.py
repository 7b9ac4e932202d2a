"""``thinblock``: the daemon (``serve``), the offline store check (``check``), and the
administrator's commands, a client of the REST API (``--api URL`` or THINBLOCK_API,
``--token`` or THINBLOCK_TOKEN).

Every listing is a table on a terminal, and ``--json`` on every command gives what the
API returns (a list command gives a list of the objects its show command gives).  Sizes
are accepted and shown with units (512K, 16MiB, 1G, 2TiB; percentages for VV limits).

Errors are one line on stderr and a non-zero exit status, never a traceback:
1 the daemon refused or the operation failed, 2 a usage error, 3 the daemon cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import httpx
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__
from .errors import InvalidArgument
from .units import Limit, format_duration, format_size, parse_size

DEFAULT_API = "http://127.0.0.1:8080"
API_PREFIX = "/api/v1"
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class CliError(Exception):
    """One line for stderr, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.status = status


# --- argument types ------------------------------------------------------------------------------


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_size_arg(text: str) -> int:
    n = _size_arg(text)
    if n <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than zero: {text!r}")
    return n


def _grow_size_arg(text: str) -> tuple[bool, int]:
    """``200GiB`` (the new size) or ``+5G`` (this much more): (relative, bytes)."""
    relative = text.strip().startswith("+")
    return relative, _positive_size_arg(text.strip().removeprefix("+"))


def _optional_size_arg(text: str) -> int | None:
    """A size, or ``none`` to remove a warning or limit."""
    if text.strip().lower() in ("none", "off", "-"):
        return None
    return _positive_size_arg(text)


def _limit_arg(text: str) -> str | int:
    """A VV limit: a size or a percentage; sent as given (the daemon keeps percentages relative)."""
    try:
        limit = Limit.parse(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{limit.percent:g}%" if limit.percent is not None else int(limit.bytes or 0)


def _optional_limit_arg(text: str) -> str | int | None:
    if text.strip().lower() in ("none", "off", "-"):
        return None
    return _limit_arg(text)


def _id_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an id: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"not an id: {text!r}")
    return value


# --- the parser ----------------------------------------------------------------------------------


def _client_options() -> _Parser:
    """Options every API command takes, before or after the command words.  SUPPRESS defaults,
    so that a value given before the command is not overwritten by the subcommand's default."""
    p = _Parser(add_help=False)
    g = p.add_argument_group("connection and output")
    g.add_argument(
        "--api",
        metavar="URL",
        default=argparse.SUPPRESS,
        help=f"the daemon's API (THINBLOCK_API; default {DEFAULT_API})",
    )
    g.add_argument("--token", default=argparse.SUPPRESS, help="bearer token (THINBLOCK_TOKEN)")
    g.add_argument(
        "--token-file",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="read the bearer token from FILE (THINBLOCK_TOKEN_FILE); keeps it out of ps and shell history",
    )
    g.add_argument(
        "--cacert",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="CA certificate(s) to check an https:// API against (THINBLOCK_CACERT; default: the system's)",
    )
    g.add_argument(
        "--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait for the daemon (default 30)"
    )
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON (for scripts)")
    return p


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and where to look, not argparse's usage block:
    ``error: thinblock vv create: the following arguments are required: --pool (see thinblock vv
    create --help)``.  Subcommand parsers are of this class too (argparse makes them so)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _fill_descriptions(parser: argparse.ArgumentParser) -> None:
    """Every command's --help opens with a description: its line in the parent's list when it
    was given no other."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                sub = action.choices[choice.dest]
                if not sub.description:
                    sub.description = choice.help
                _fill_descriptions(sub)


# A negative size where a size is expected ("vv grow VV -5G"): argparse would take it for an
# option and answer with something unrelated; no option of thinblock starts with a digit.
_NEGATIVE_SIZE = re.compile(r"^-\d+(\.\d+)?\s*[KMGTPE]?(i?B)?$", re.IGNORECASE)


def build_parser() -> argparse.ArgumentParser:
    common = _client_options()
    parser = _Parser(
        prog="thinblock",
        description="Thin-provisioning block storage (3PAR-style): the daemon and its administration.",
        parents=[common],
        # No abbreviations at this level: it classifies every word of the command line, and would
        # take `metadata copy --to` for an ambiguous --token/--token-file.
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"thinblock {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(group: Any, name: str, help_text: str, func: Callable[..., Any]) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name, help=help_text, description=help_text, parents=[common]
        )
        p.set_defaults(func=func)
        return p

    def noun(name: str, help_text: str) -> Any:
        p = commands.add_parser(name, help=help_text, description=help_text)
        return p.add_subparsers(dest="verb", metavar="VERB", required=True)

    # serve / check: local, no API
    serve = commands.add_parser(
        "serve", help="run the daemon (NBD and the REST API)", description=_SERVE_HELP
    )
    serve.set_defaults(func=cmd_serve)
    serve.add_argument("--config", metavar="FILE", help="TOML configuration file (flags override it)")
    serve.add_argument("--data", metavar="DIR", help="data directory (default ./thinblock-data)")
    serve.add_argument(
        "--metadata",
        metavar="URL",
        help="metadata store: sqlite: (default, in the data directory) or postgresql://USER@HOST/DB"
        " (THINBLOCK_METADATA)",
    )
    serve.add_argument(
        "--nbd", metavar="HOST:PORT", help='NBD listen address (default 127.0.0.1:10809; "" for none)'
    )
    serve.add_argument("--nbd-unix", metavar="PATH", help="also listen for NBD on this Unix socket")
    serve.add_argument(
        "--iscsi",
        metavar="HOST:PORT",
        help='serve iSCSI targets here (off by default; port 3260 when omitted; "" for none)',
    )
    serve.add_argument("--api", metavar="HOST:PORT", help="API listen address (default 127.0.0.1:8080)")
    serve.add_argument(
        "--api-token", metavar="TOKEN", help="bearer token the API demands (THINBLOCK_API_TOKEN)"
    )
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    serve.add_argument("--log-format", choices=("logfmt", "json"))
    serve.add_argument(
        "--default-export", metavar="VV", help='the export of an empty NBD export name ("" for none)'
    )
    serve.add_argument(
        "--chunklet-size", metavar="SIZE", help="default chunklet size of new PDs (default 256MiB)"
    )
    serve.add_argument("--max-dirty", metavar="SIZE", help="write-back cache bound (default 256MiB)")
    serve.add_argument("--webhook-url", metavar="URL", help="POST alerts here as JSON")
    serve.add_argument(
        "--pd-allowed-root",
        metavar="DIR",
        action="append",
        help="a directory where file PDs may lie besides the data directory (repeatable; engine.pd_allowed_roots)",
    )
    serve.add_argument(
        "--first-start-pd-size", metavar="SIZE", help="size of the PDs a first start creates (default 64GiB)"
    )
    serve.add_argument(
        "--no-first-start",
        action="store_true",
        help="do not create PDs, pool and volume in an empty data directory",
    )
    serve.add_argument("--node", metavar="NAME", help="this node's name in a node pair")
    serve.add_argument(
        "--partner", metavar="HOST:PORT", help="the partner node's mirror listener (default port 10810)"
    )
    serve.add_argument(
        "--mirror-listen", metavar="HOST:PORT", help="this node's mirror listener (default 127.0.0.1:10810)"
    )
    serve.add_argument(
        "--partner-timeout",
        metavar="SECONDS",
        type=float,
        help="partner silent this long: degrade (default 1)",
    )
    serve.add_argument(
        "--partner-data",
        metavar="DIR",
        help="the partner's data directory: take it over when the partner dies",
    )
    serve.add_argument(
        "--partner-service",
        metavar="HOST:PORT",
        help="the partner's NBD address, served here after a takeover",
    )
    serve.add_argument(
        "--partner-metadata",
        metavar="URL",
        help="the partner's PostgreSQL metadata store: a takeover takes the partner's lease there",
    )
    serve.add_argument(
        "--partner-api",
        metavar="URL",
        help="the partner's REST API (http://HOST:PORT): for vv move, vv create --node, node list",
    )
    serve.add_argument(
        "--partner-api-token-file",
        metavar="FILE",
        help="a file holding an admin token of the partner's API",
    )
    serve.add_argument(
        "--lease-ttl",
        metavar="SECONDS",
        type=float,
        help="with --partner-metadata: this node's lease's time to live (default 15)",
    )
    serve.add_argument(
        "--fence-margin",
        metavar="SECONDS",
        type=float,
        help="with --partner-metadata: stop writing this long before the lease could expire (default 1)",
    )

    check = commands.add_parser(
        "check", help="check a data directory's metadata store offline", parents=[common]
    )
    check.set_defaults(func=cmd_check)
    check.add_argument(
        "--data", metavar="DIR", help="data directory (default: the config's, or ./thinblock-data)"
    )
    check.add_argument(
        "--metadata",
        metavar="URL",
        help="the metadata store to check: sqlite:DIR or postgresql://USER@HOST/DB (THINBLOCK_METADATA;"
        " default: the config's, or the data directory's SQLite store)",
    )
    check.add_argument("--config", metavar="FILE", help="take the data directory from this config file")

    metadata = noun("metadata", "the metadata store, offline (the daemon stopped)")
    copy_help = (
        "copy a stopped node's metadata into an empty store (SQLite to PostgreSQL), checked before and after"
    )
    p = metadata.add_parser("copy", help=copy_help, description=copy_help)
    p.set_defaults(func=cmd_metadata_copy)
    p.add_argument(
        "--from",
        dest="source",
        metavar="URL",
        required=True,
        help="the store to copy: sqlite:DATA_DIR (the data directory's own store)",
    )
    p.add_argument(
        "--to", dest="target", metavar="URL", required=True, help="an empty store: postgresql://USER@HOST/DB"
    )
    p.add_argument("--json", action="store_true", help="print JSON (for scripts)")

    completion = commands.add_parser(
        "completion",
        help="print the shell completion script for bash, zsh or fish",
        description=_COMPLETION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    completion.set_defaults(func=cmd_completion)
    completion.add_argument("shell", choices=COMPLETION_SHELLS, metavar="SHELL", help="bash, zsh or fish")

    leaf(commands, "status", "the node at a glance: uptime, pools, volumes, open alerts", cmd_status)
    iscsi = noun("iscsi", "the iSCSI target (serve --iscsi)")
    leaf(iscsi, "sessions", "logged-in iSCSI sessions: initiator, address, volume, LUNs", cmd_iscsi_sessions)

    node = noun("node", "the node pair")
    leaf(node, "list", "this node and its mirror link: partner, epoch, mirror state and lag", cmd_node_list)
    leaf(
        node,
        "failback",
        "hand the volumes this node took over back to their owner (rejoined and in sync; no copy)",
        cmd_node_failback,
    )

    pd = noun("pd", "physical disks")
    p = leaf(pd, "add", "add a PD: a file (created sparse when missing) or a block device", cmd_pd_add)
    p.add_argument("path", metavar="PATH")
    p.add_argument("--size", type=_positive_size_arg, help="size of a new file (e.g. 64GiB)")
    p.add_argument("--chunklet-size", type=_positive_size_arg, help="default: the daemon's (256MiB)")
    p.add_argument(
        "--force",
        action="store_true",
        help="take a block device holding a partition table or file system (asks to type its path)",
    )
    p.add_argument(
        "--confirm", metavar="PATH", help="with --force, without a terminal: the device path again"
    )
    leaf(pd, "list", "list PDs", cmd_pd_list)
    leaf(pd, "show", "show a PD", cmd_pd_show).add_argument("id", type=_id_arg, metavar="ID")
    p = leaf(pd, "fail", "mark a PD failed: its LDs go degraded (asks first on a terminal)", cmd_pd_fail)
    p.add_argument("id", type=_id_arg, metavar="ID")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation on a terminal")
    p = leaf(
        pd,
        "restore",
        "return a failed PD that turned out healthy to service, resynchronised from the others first",
        cmd_pd_restore,
    )
    p.add_argument("id", type=_id_arg, metavar="ID")
    p = leaf(
        pd,
        "replace",
        "rebuild a failed PD's LD members onto NEW (added with pd add), then remove the failed PD",
        cmd_pd_replace,
    )
    p.add_argument("id", type=_id_arg, metavar="OLD")
    p.add_argument("new", type=_id_arg, metavar="NEW")
    leaf(pd, "remove", "remove a PD none of whose chunklets is used", cmd_pd_remove).add_argument(
        "id", type=_id_arg, metavar="ID"
    )

    pool = noun("pool", "pools (RAID policy, growth increment, warning and limit)")
    p = leaf(pool, "create", "create a pool", cmd_pool_create)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--raid", type=int, choices=(0, 1, 5), required=True)
    p.add_argument(
        "--set-size", type=int, metavar="N", help="PDs per RAID set (default: 2 for RAID 0 and 1, 4 for 5)"
    )
    p.add_argument("--step", type=_positive_size_arg, metavar="SIZE", help="RAID step size (default 128K)")
    p.add_argument(
        "--region-size", type=_positive_size_arg, metavar="SIZE", help="allocation unit (default 1MiB)"
    )
    p.add_argument(
        "--growth-increment",
        type=_positive_size_arg,
        metavar="SIZE",
        help="usable size of each new LD (default 1GiB, or the growth limit when smaller)",
    )
    p.add_argument("--growth-warning", type=_positive_size_arg, metavar="SIZE")
    p.add_argument("--growth-limit", type=_positive_size_arg, metavar="SIZE")
    leaf(pool, "list", "list pools", cmd_pool_list)
    leaf(pool, "show", "show a pool", cmd_pool_show).add_argument("name", metavar="NAME")
    p = leaf(pool, "set", "change a pool's growth settings", cmd_pool_set)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--growth-increment", type=_positive_size_arg, metavar="SIZE")
    p.add_argument(
        "--growth-warning", type=_optional_size_arg, metavar="SIZE|none", default=argparse.SUPPRESS
    )
    p.add_argument("--growth-limit", type=_optional_size_arg, metavar="SIZE|none", default=argparse.SUPPRESS)
    leaf(
        pool, "compact", "release LDs with no region in use back to free chunklets", cmd_pool_compact
    ).add_argument("name", metavar="NAME")
    leaf(pool, "delete", "delete a pool with no volumes", cmd_pool_delete).add_argument(
        "name", metavar="NAME"
    )

    vv = noun("vv", "virtual volumes")
    p = leaf(vv, "create", "create a thin volume", cmd_vv_create)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--pool", required=True)
    p.add_argument("--size", type=_positive_size_arg, required=True, help="virtual size (e.g. 100GiB)")
    p.add_argument(
        "--alloc-warning", type=_limit_arg, metavar="SIZE|PCT", help="alert when allocation passes it"
    )
    p.add_argument("--alloc-limit", type=_limit_arg, metavar="SIZE|PCT", help="refuse allocation past it")
    p.add_argument(
        "--cache", choices=("writeback", "writethrough"), help="cache mode (default: the daemon's)"
    )
    p.add_argument(
        "--node",
        metavar="NAME",
        help="in a node pair: the node to create it on (default: the one with fewer volumes)",
    )
    _snapshot_space_args(p, _limit_arg, "SIZE|PCT", None)
    p = leaf(vv, "list", "list volumes", cmd_vv_list)
    p.add_argument("--pool", help="only the volumes of this pool")
    leaf(vv, "show", "show a volume", cmd_vv_show).add_argument("name", metavar="NAME")
    p = leaf(
        vv, "set", "change a volume's allocation or snapshot space warning, limit, or cache mode", cmd_vv_set
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--alloc-warning", type=_optional_limit_arg, metavar="SIZE|PCT|none", default=argparse.SUPPRESS
    )
    p.add_argument(
        "--alloc-limit", type=_optional_limit_arg, metavar="SIZE|PCT|none", default=argparse.SUPPRESS
    )
    p.add_argument("--cache", choices=("writeback", "writethrough"))
    _snapshot_space_args(p, _optional_limit_arg, "SIZE|PCT|none", argparse.SUPPRESS)
    p = leaf(
        vv,
        "access",
        "which NBD clients may open a volume, and how; allow, deny or remove a client (admin)",
        cmd_vv_access,
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "action",
        nargs="?",
        choices=("show", "allow", "deny", "remove"),
        default="show",
        help="allow or deny a client, remove its rule (rules of the config file stay); default: show",
    )
    p.add_argument(
        "client",
        nargs="?",
        metavar="CLIENT",
        help="certificate subject (CN=...), psk:NAME, address or network (10.1.0.0/16), unix, or *",
    )
    p.add_argument(
        "--read-only", action="store_true", help="allow: read-only (NBD_FLAG_READ_ONLY, writes EPERM)"
    )
    p = leaf(
        vv,
        "move",
        "hand a volume over to the partner node (drain, copy, verify, switch; admin)",
        cmd_vv_move,
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--to", required=True, metavar="NODE", help="the partner node's name")
    p = leaf(vv, "grow", "grow a volume's virtual size", cmd_vv_grow)
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "size", type=_grow_size_arg, metavar="[+]SIZE", help="the new size, or +SIZE: this much more"
    )
    p = leaf(
        vv,
        "rename",
        "rename a volume: its data stays; connected clients go on with it, new ones use NEW",
        cmd_vv_rename,
    )
    p.add_argument("name", metavar="OLD")
    p.add_argument("new_name", metavar="NEW")

    p = leaf(vv, "snapshot", "take a read-only snapshot of a volume (no data copied)", cmd_vv_snapshot)
    p.add_argument("name", metavar="VV")
    p.add_argument("snapshot", metavar="NAME", help="the snapshot's name")
    p = leaf(vv, "revert", "make a volume the content of one of its snapshots (atomic)", cmd_vv_revert)
    p.add_argument("name", metavar="VV")
    p.add_argument("snapshot", metavar="SNAPSHOT")
    p.add_argument(
        "--force", action="store_true", help="revert even while clients are connected (their caches go stale)"
    )
    p = leaf(
        vv,
        "diff",
        "the ranges where B may differ from its older snapshot A (incremental backup)",
        cmd_vv_diff,
    )
    p.add_argument("base", metavar="A")
    p.add_argument("target", metavar="B")
    p = leaf(vv, "clone", "make a writable clone of a snapshot (no data copied)", cmd_vv_clone)
    p.add_argument("snapshot", metavar="SNAPSHOT")
    p.add_argument("clone", metavar="NAME", help="the clone's name")
    p = leaf(vv, "delete", "delete a volume (its regions go back to the pool, zeroed)", cmd_vv_delete)
    p.add_argument("name", metavar="NAME")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation on a terminal")
    p.add_argument(
        "--force",
        action="store_true",
        help="delete it even while clients are connected (they are disconnected; their I/O fails)",
    )
    p = leaf(
        vv, "import", "copy a raw image (file or nbd:// URI) into a volume, skipping zeros", cmd_vv_import
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("source", metavar="SOURCE", help="raw image file, block device, or nbd:// URI")
    p.add_argument(
        "--nbd", metavar="URI", help="reach the daemon's NBD at this URI (default: what it reports)"
    )
    p.add_argument(
        "--format",
        choices=("raw",),
        help="copy SOURCE's bytes as they are even when qemu-img sees an image format in them",
    )
    p.add_argument("--force", action="store_true", help="overwrite a volume that holds data")
    p = leaf(vv, "export", "copy a volume out to a raw image (file or nbd:// URI), sparse", cmd_vv_export)
    p.add_argument("name", metavar="NAME")
    p.add_argument("dest", metavar="DEST", help="raw image file, block device, or nbd:// URI")
    p.add_argument(
        "--nbd", metavar="URI", help="reach the daemon's NBD at this URI (default: what it reports)"
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing file")

    alerts = commands.add_parser(
        "alerts", help="open alerts (--all: cleared ones too); alerts ack ID", parents=[common]
    )
    alerts.set_defaults(func=cmd_alerts)
    alerts.add_argument("--all", action="store_true", help="include cleared alerts")
    alert_verbs = alerts.add_subparsers(dest="verb", metavar="VERB")
    leaf(alert_verbs, "ack", "acknowledge an alert", cmd_alert_ack).add_argument(
        "id", type=_id_arg, metavar="ID"
    )

    ld = noun("ld", "logical disks (RAID sets of chunklets)")
    p = leaf(ld, "list", "list LDs", cmd_ld_list)
    p.add_argument("--pool", help="only the LDs of this pool")
    leaf(ld, "show", "show an LD: RAID layout, chunklets, regions, health", cmd_ld_show).add_argument(
        "id", type=_id_arg, metavar="ID"
    )

    p = leaf(commands, "rebuild", "rebuild degraded LDs onto spare chunklets, with progress", cmd_rebuild)
    p.add_argument("--no-wait", action="store_true", help="start it and return")

    token = noun("token", "API tokens with roles (read-only, operator, admin); admin only")
    p = leaf(token, "create", "create a token; its secret is shown once", cmd_token_create)
    p.add_argument("name", metavar="NAME", help="who or what uses it (letters, digits, . _ @ -)")
    p.add_argument("--role", required=True, choices=("read-only", "operator", "admin"), help="what it may do")
    p.add_argument(
        "--output", metavar="FILE", help="write the secret to FILE (mode 0600, for --token-file) instead"
    )
    leaf(token, "list", "list tokens (never their secrets)", cmd_token_list)
    leaf(token, "revoke", "revoke a token: it stops working at once", cmd_token_revoke).add_argument(
        "id", type=_id_arg, metavar="ID"
    )
    _fill_descriptions(parser)
    return parser


COMPLETION_SHELLS = ("bash", "zsh", "fish")

_COMPLETION_HELP = """\
Print the completion script for SHELL (commands, options, choices).  Load it for this shell with
  source <(thinblock completion bash)          # bash (or zsh: thinblock completion zsh)
  thinblock completion fish | source           # fish
or keep it where the shell looks: /etc/bash_completion.d/thinblock,
~/.config/fish/completions/thinblock.fish, a directory on zsh's $fpath as _thinblock."""


_SERVE_HELP = """\
Run the daemon: NBD (default 127.0.0.1:10809) and the REST API (default 127.0.0.1:8080) from one
event loop.  The first start in an empty data directory creates four sparse 64 GiB file PDs,
pool 'default' (RAID 1) and a 100 GiB thin volume 'vol0', the default export.  SIGTERM or
SIGINT stops it cleanly (in-flight requests finish, everything is flushed)."""


# --- the client ----------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    out: Console
    err: Console
    transport: httpx.BaseTransport | None = None
    _client: httpx.Client | None = None

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    @property
    def api(self) -> str:
        url = getattr(self.args, "api", None) or os.environ.get("THINBLOCK_API") or DEFAULT_API
        url = url.rstrip("/")
        if "://" not in url:
            url = "http://" + url
        return url.removesuffix(API_PREFIX)

    @property
    def token(self) -> str | None:
        """--token, else --token-file, else THINBLOCK_TOKEN, else THINBLOCK_TOKEN_FILE."""
        token = getattr(self.args, "token", None)
        if token:
            return str(token)
        token_file = getattr(self.args, "token_file", None)
        if not token_file:
            token = os.environ.get("THINBLOCK_TOKEN")
            if token:
                return token
            token_file = os.environ.get("THINBLOCK_TOKEN_FILE")
        if not token_file:
            return None
        try:
            text = Path(token_file).expanduser().read_text().strip()
        except OSError as exc:
            raise CliError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
        if not text:
            raise CliError(f"the token file {token_file} is empty")
        return text.splitlines()[0].strip()

    @property
    def client(self) -> httpx.Client:
        if self._client is None:
            token = self.token
            headers = {"user-agent": f"thinblock-cli/{__version__}"}
            if token:
                headers["authorization"] = f"Bearer {token}"
            cacert = getattr(self.args, "cacert", None) or os.environ.get("THINBLOCK_CACERT")
            self._client = httpx.Client(
                base_url=self.api + API_PREFIX,
                headers=headers,
                timeout=getattr(self.args, "timeout", None) or 30.0,
                transport=self.transport,
                verify=_tls_context(cacert) if cacert else True,
            )
        return self._client

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; the decoded JSON (None for 204).  Failures become a CliError.

        State-changing calls always carry a JSON body (``{}`` for actions without parameters):
        the API refuses anything else, which is what stops cross-site form posts."""
        if method not in ("GET", "HEAD") and "json" not in kwargs and "content" not in kwargs:
            kwargs["json"] = {}
        try:
            response = self.client.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise CliError(
                f"cannot reach thinblock at {self.api}: is `thinblock serve` running? ({_reason(exc)})",
                EXIT_UNREACHABLE,
            ) from None
        except httpx.TimeoutException:
            raise CliError(
                f"thinblock at {self.api} did not answer in time (--timeout)", EXIT_UNREACHABLE
            ) from None
        except httpx.HTTPError as exc:
            raise CliError(
                f"talking to thinblock at {self.api} failed: {_reason(exc)}", EXIT_UNREACHABLE
            ) from None
        if response.status_code == 204:
            return None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.is_success:
            if body is None:
                raise CliError(
                    f"thinblock at {self.api} answered {method} {path} with something that is not JSON"
                )
            return body
        message = body.get("error") if isinstance(body, dict) else None
        if response.status_code == 401:
            hint = "" if self.token else " (give --token or set THINBLOCK_TOKEN)"
            raise CliError(f"{message or 'unauthorized'}{hint}")
        if not message:
            message = f"HTTP {response.status_code} from {self.api} for {method} {path}"
        raise CliError(str(message))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def print_json(self, value: Any) -> None:
        self.out.file.write(json.dumps(value, indent=2, sort_keys=False) + "\n")

    def print_table(self, table: Table) -> None:
        if self.out.is_terminal:
            self.out.print(table)
            return
        # Piped: no padding at the ends of lines (rich pads every cell to its column's width).
        with self.out.capture() as captured:
            self.out.print(table)
        self.out.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))

    def say(self, message: str) -> None:
        self.out.print(message, highlight=False, markup=False)


def _tls_context(cacert: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        raise CliError(f"cannot use {cacert} as CA certificates: {_reason(exc)}") from None


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text or type(exc).__name__


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


# --- rendering -----------------------------------------------------------------------------------


# Columns whose text wraps (at spaces) on a narrow terminal; every other column keeps its cells
# on one line, so that names, sizes and states are never broken in the middle of a word.
_WRAPPING_COLUMNS = frozenset({"MESSAGE", "PATH"})


def _table(*columns: str, title: str | None = None) -> Table:
    """A listing that fits an 80-column terminal: short headers (units in the cells), one space
    between columns, only the free-text columns wrap."""
    table = Table(
        title=title,
        box=box.SIMPLE_HEAD,
        title_justify="left",
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    for name in columns:
        if name in _WRAPPING_COLUMNS:
            table.add_column(name, overflow="fold", ratio=1)
        else:
            table.add_column(name, no_wrap=True)
    return table


def _kv_table(rows: Sequence[tuple[str, Any]], title: str | None = None) -> Table:
    table = Table(box=None, show_header=False, title=title, title_justify="left", pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    return table


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _limit_text(value: int | None, spec: str | None) -> str:
    if value is None:
        return "-"
    if spec and spec.endswith("%"):
        return f"{spec} ({format_size(value)})"
    return format_size(value)


def _size_for_command(n: int) -> str:
    """A size to paste into a command, exact and in units: 64MiB, 1536KiB, 1000000 (bytes)."""
    for unit, mult in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def _forecast_text(f: dict[str, Any] | None, limit_word: str = "limit") -> str:
    """``2 MiB/s over 1h 0m; warning in 3h 10m, limit in 5h 2m`` (from the daemon's history)."""
    if not f or f.get("rate") is None:
        return "- (no history yet)"
    if f["rate"] <= 0:
        return f"not growing (over {format_duration(f['window'], parts=3)})"
    parts = []
    for key, word in (("to_warning", "warning"), ("to_limit", limit_word)):
        if f.get(key) is not None:
            parts.append(
                f"{word} reached" if f[key] == 0 else f"{word} in {format_duration(f[key], parts=3)}"
            )
    text = f"{format_size(round(f['rate']))}/s over {format_duration(f['window'], parts=3)}"
    return text + (f"; {', '.join(parts)}" if parts else "")


def _eta_text(f: dict[str, Any] | None) -> str:
    """The time to the limit for a table column: 5h 2m, 0 (reached), - (none)."""
    if not f or f.get("to_limit") is None:
        return "-"
    return "reached" if f["to_limit"] == 0 else format_duration(f["to_limit"], parts=3)


def _ratio(value: float | None) -> str:
    """The overcommit ratio: virtual sizes over what the pool can hold at most."""
    return "-" if value is None else f"{value:g}x"


def _time_text(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


_HEALTH_STYLE = {
    "normal": "green",
    "healthy": "green",
    "degraded": "yellow",
    "warning": "yellow",
    "rebuilding": "cyan",
    "failed": "red",
    "out-of-space": "red",
}
_SEVERITY_STYLE = {"info": "blue", "warning": "yellow", "critical": "bold red"}


def _styled(text: str, styles: dict[str, str]) -> str:
    style = styles.get(text)
    return f"[{style}]{text}[/]" if style else text


def render_pd(pd: dict[str, Any]) -> Table:
    return _kv_table(
        [
            ("id", pd["id"]),
            ("path", pd["path"]),
            ("size", format_size(pd["size"])),
            ("chunklet size", format_size(pd["chunklet_size"])),
            ("chunklets", f"{pd['chunklets_used']} used, {pd['chunklets_free']} free of {pd['chunklets']}"),
            ("health", _styled(pd["health"], _HEALTH_STYLE)),
        ],
        title=f"PD {pd['id']}",
    )


def render_nodes(nodes: list[dict[str, Any]]) -> Table:
    t = _table(
        "NODE",
        "ROLE",
        "PARTNER",
        "LEASE",
        "EPOCH",
        "MIRROR",
        "IN FLIGHT",
        "LATENCY",
        "LOST",
        "HOLDS",
        "VOLUMES",
        title="nodes",
    )
    for n in nodes:
        if not n.get("reachable", True):
            t.add_row(n["node"], n["role"], n["partner_node"] or "-", *["-"] * 7, "[red]unreachable[/]")
            continue
        partner = n["partner_node"] or n["partner"] or "-"
        holds = f"{format_size(n['held_bytes'])} of {n['holding_for']}" if n["holding_for"] else "-"
        if n["taken_over"]:
            holds += " (took over"
            if n.get("taken_over_mirror"):
                holds += f", mirrored back: {n['taken_over_mirror']}"
            holds += ")"
        if n.get("own_held_writes"):
            holds += f"; {format_size(n['own_held_bytes'])} of its own volumes"
        t.add_row(
            n["node"],
            n["role"],
            partner,
            "-" if n.get("lease_epoch") is None else str(n["lease_epoch"]),
            str(n["epoch"]),
            n["mirror"],
            format_size(n["in_flight_bytes"]),
            f"{n['last_latency_s'] * 1000:.2f} ms",
            str(n["sessions_lost"]),
            holds,
            "-" if n.get("volumes") is None else str(n["volumes"]),
        )
    return t


def render_pds(pds: list[dict[str, Any]]) -> Table:
    t = _table("ID", "PATH", "SIZE", "CHUNKLET", "USED", "FREE", "HEALTH", title="physical disks")
    for pd in pds:
        t.add_row(
            str(pd["id"]),
            pd["path"],
            format_size(pd["size"]),
            format_size(pd["chunklet_size"]),
            str(pd["chunklets_used"]),
            str(pd["chunklets_free"]),
            _styled(pd["health"], _HEALTH_STYLE),
        )
    return t


def render_pool(p: dict[str, Any]) -> Table:
    return _kv_table(
        [
            ("name", p["name"]),
            ("raid", f"RAID {p['raid']}, set size {p['set_size']}, step {format_size(p['step'])}"),
            ("region size", format_size(p["region_size"])),
            ("capacity", format_size(p["capacity"])),
            ("used", f"{format_size(p['used'])} ({_pct(p['used'], p['capacity'])})"),
            ("free", format_size(p["free"])),
            ("growth increment", format_size(p["growth_increment"])),
            ("growth warning", format_size(p["growth_warning"])),
            ("growth limit", format_size(p["growth_limit"])),
            ("LDs", p["lds"]),
            ("volumes", f"{p['volumes']}: {format_size(p.get('virtual'))} virtual"),
            ("overcommit", _ratio(p.get("overcommit"))),
            ("forecast", _forecast_text(p.get("forecast"), "growth limit")),
            ("state", _styled(p["state"], _HEALTH_STYLE)),
        ],
        title=f"pool {p['name']}",
    )


def render_pools(pools: list[dict[str, Any]]) -> Table:
    t = _table(
        "NAME", "RAID", "USED", "SIZE", "LIMIT", "FULL IN", "VIRTUAL", "OVERCOMMIT", "STATE", title="pools"
    )
    for p in pools:
        t.add_row(
            p["name"],
            f"{p['raid']} ({p['set_size']})",
            format_size(p["used"]),
            format_size(p["capacity"]),
            format_size(p["growth_limit"]),
            _eta_text(p.get("forecast")),
            format_size(p.get("virtual")),
            _ratio(p.get("overcommit")),
            _styled(p["state"], _HEALTH_STYLE),
        )
    return t


def render_vv(v: dict[str, Any]) -> Table:
    return _kv_table(
        [
            ("name", v["name"]),
            ("kind", v.get("kind", "volume") + ("" if v.get("kind") != "snapshot" else " (read-only)")),
            ("parent", v.get("parent") or "none"),
            ("children", ", ".join(v.get("children", [])) or "none"),
            ("pool", v["pool"]),
            ("size", format_size(v["size"])),
            (
                "allocated",
                f"{format_size(v['allocated'])} ({_pct(v['allocated'], v['size'])}), "
                f"{v['regions_allocated']} regions of {format_size(v['region_size'])}",
            ),
            (
                "space",
                f"{format_size(v.get('exclusive', 0))} its own, {format_size(v.get('shared', 0))} shared",
            ),
            ("alloc warning", _limit_text(v["alloc_warning"], v.get("alloc_warning_spec"))),
            ("alloc limit", _limit_text(v["alloc_limit"], v.get("alloc_limit_spec"))),
            ("snapshot space", _snapshot_space_text(v)),
            ("cache", v["cache_mode"]),
            ("dirty", format_size(v["dirty_bytes"])),
            ("forecast", _forecast_text(v.get("forecast"))),
            ("clients", ", ".join(f"{c['protocol']} {c['peer']}" for c in v.get("clients", [])) or "none"),
            ("NBD access", _access_text(v.get("access"))),
            ("created", _time_text(v["created"])),
            ("export", v.get("export_uri")),
        ],
        title=f"volume {v['name']}",
    )


def _snapshot_space_text(v: dict[str, Any]) -> str:
    """``4 MiB held only by its snapshots; warning 10% (6.4 MiB), limit 20% (12.8 MiB), fail``."""
    if v.get("kind") == "snapshot":
        return "-"
    text = f"{format_size(v.get('snapshot_space', 0))} held only by its snapshots"
    warning = _limit_text(v.get("snapshot_warning"), v.get("snapshot_warning_spec"))
    limit = _limit_text(v.get("snapshot_limit"), v.get("snapshot_limit_spec"))
    if v.get("snapshot_limit") is not None:
        limit += f" ({v.get('snapshot_limit_policy', 'fail')} at it)"
    return f"{text}; warning {warning}, limit {limit}"


def _access_text(access: dict[str, Any] | None) -> str:
    if not access or not access["rules"]:
        return "every client, read-write (no rule)"
    text = ", ".join(f"{r['client']} {r['mode']}" for r in access["rules"])
    return text if access["restricted"] else text + "; every other client read-write"


def _vv_tree(vvs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The volumes in tree order, each with its name indented under its parent's and marked
    when it is a snapshot or clone: ``db``, ``└ db-mon (snap)``, ``  └ test (clone)``."""
    by_name = {v["name"]: v for v in vvs}
    out: list[tuple[str, dict[str, Any]]] = []

    def walk(v: dict[str, Any], depth: int) -> None:
        mark = {"snapshot": " (snap)", "clone": " (clone)"}.get(v.get("kind", "volume"), "")
        out.append((("  " * (depth - 1) + "└ " if depth else "") + v["name"] + mark, v))
        for child in v.get("children", []):
            if child in by_name:
                walk(by_name[child], depth + 1)

    for v in vvs:
        if v.get("parent") not in by_name:  # a root here (its parent gone, or filtered out)
            walk(v, 0)
    return out


def render_vvs(vvs: list[dict[str, Any]]) -> Table:
    # WRITE: the cache mode as "write through" / "write back", to fit 80 columns.  Snapshots and
    # clones are listed under the volume they were made from; vv show has their shared space.
    t = _table("NAME", "POOL", "SIZE", "ALLOC", "USE%", "WARN", "LIMIT", "WRITE", "CLIENTS", title="volumes")
    for label, v in _vv_tree(vvs):
        t.add_row(
            label,
            v["pool"],
            format_size(v["size"]),
            format_size(v["allocated"]),
            _pct(v["allocated"], v["size"]),
            # as given (80%, 10 GiB); vv show adds what a percentage comes to
            v.get("alloc_warning_spec") or format_size(v["alloc_warning"]),
            v.get("alloc_limit_spec") or format_size(v["alloc_limit"]),
            v["cache_mode"].removeprefix("write"),
            str(len(v.get("clients", []))),
        )
    return t


def render_ld(ld: dict[str, Any]) -> list[Table]:
    info = _kv_table(
        [
            ("id", ld["id"]),
            ("pool", ld["pool"]),
            ("raid", f"RAID {ld['raid']}, set size {ld['set_size']}, step {format_size(ld['step'])}"),
            ("size", format_size(ld["size"])),
            (
                "regions",
                f"{ld['regions_used']} used, {ld['regions_free']} free of {ld['regions']} "
                f"({format_size(ld['region_size'])} each)",
            ),
            ("health", _styled(ld["health"], _HEALTH_STYLE)),
        ],
        title=f"LD {ld['id']}",
    )
    chunklets = _table("ROW", "COLUMN", "PD", "CHUNKLET", "OFFSET", title="chunklets")
    for c in ld["chunklets"]:
        chunklets.add_row(
            str(c["row"]), str(c["column"]), str(c["pd_id"]), str(c["index"]), format_size(c["offset"])
        )
    return [info, chunklets]


def render_lds(lds: list[dict[str, Any]]) -> Table:
    t = _table(
        "ID", "POOL", "RAID", "SIZE", "REGIONS", "USED", "FREE", "PDS", "HEALTH", title="logical disks"
    )
    for ld in lds:
        pds = sorted({c["pd_id"] for c in ld["chunklets"]})
        t.add_row(
            str(ld["id"]),
            ld["pool"],
            f"{ld['raid']} ({ld['set_size']})",
            format_size(ld["size"]),
            str(ld["regions"]),
            str(ld["regions_used"]),
            str(ld["regions_free"]),
            ",".join(map(str, pds)),
            _styled(ld["health"], _HEALTH_STYLE),
        )
    return t


def render_alerts(alerts: list[dict[str, Any]]) -> Table:
    # The object is named in the message; --json has every field.
    t = _table("ID", "TIME", "SEVERITY", "KIND", "STATE", "MESSAGE", title="alerts")
    for a in alerts:
        t.add_row(
            str(a["id"]),
            time.strftime("%m-%d %H:%M", time.localtime(a["time"])),
            _styled(a["severity"], _SEVERITY_STYLE),
            a["kind"],
            "ack" if a["state"] == "acknowledged" else a["state"],
            a["message"],
        )
    return t


def _status_forecast(forecasts: dict[str, Any]) -> str:
    """The pool nearest to its growth limit at the last hour's rate, or that none is near."""
    timed = [(f["to_limit"], name) for name, f in forecasts.items() if f.get("to_limit") is not None]
    if not timed:
        return "no pool is growing toward a growth limit"
    seconds, name = min(timed)
    if seconds == 0:
        return f"pool {name} is at its growth limit"
    return (
        f"pool {name} reaches its growth limit in {format_duration(seconds, parts=3)} at the last hour's rate"
    )


def _pair_health(p: dict[str, Any]) -> str:
    """The pair at a glance: the mirror's state (red when write-back volumes write through),
    what this node holds of its partner, a takeover."""
    partner = p.get("partner_node") or p.get("partner") or "?"
    mirror = p["mirror"]
    if mirror == "in-sync":
        shown = "[green]in sync[/]"
    elif mirror == "partner-only":
        shown = "[yellow]partner only[/] (no volumes of its own served here)"
    else:
        shown = f"[red]{mirror}: write-back volumes written through[/]"  # syncing or degraded
    text = f"with {partner}: mirror {shown}"
    if mirror == "in-sync":
        text += f", last round trip {p['last_latency_s'] * 1000:.2f} ms"
    if p.get("holding_for"):
        text += f"; holding {p['held_writes']} writes ({format_size(p['held_bytes'])}) of {p['holding_for']}"
    if p.get("own_held_writes"):
        text += (
            f"; holding {p['own_held_writes']} writes ({format_size(p['own_held_bytes'])}) of its own volumes"
        )
    if p.get("taken_over"):
        text += f"; [yellow]took over {p.get('holding_for') or 'its partner'}[/]"
        if p.get("taken_over_mirror"):
            text += f" (their mirror: {p['taken_over_mirror']})"
    if p.get("lease_epoch") is not None:
        text += f"; lease epoch {p['lease_epoch']}"
    return text


def render_status(s: dict[str, Any]) -> Table:
    if s.get("role") == "partner-only":  # rejoined as partner: api/partner_only.py
        return _kv_table(
            [
                ("node", f"{s['node']} (thinblock {s['version']})"),
                ("uptime", format_duration(s["uptime"], parts=3)),
                (
                    "role",
                    "[yellow]partner only[/]: rejoined, its volumes served by "
                    f"{s.get('served_by') or 'its partner'} until its lease is free again",
                ),
                ("pair", _pair_health(s["pair"])),
            ]
        )
    nbd = s.get("nbd") or {}
    where = nbd.get("uri") or ""
    if nbd.get("unix_socket"):
        where = f"{where} unix:{nbd['unix_socket']}".strip()
    return _kv_table(
        [
            ("node", f"{s['node']} (thinblock {s['version']})"),
            ("uptime", format_duration(s["uptime"], parts=3)),
            (
                "NBD",
                f"{where or '-'}"
                + (f", default export {nbd['default_export']}" if nbd.get("default_export") else "")
                + (f", TLS {nbd['tls']}" if nbd.get("tls", "off") != "off" else "")
                + (
                    " [red](beyond loopback without TLS: open to anyone who reaches it)[/]"
                    if nbd.get("exposed_without_tls")
                    else ""
                ),
            ),
            ("PDs", f"{s['pds']}" + (f" ([red]{s['pds_failed']} failed[/])" if s["pds_failed"] else "")),
            (
                "pools",
                f"{s['pools']}: {format_size(s['used'])} used of {format_size(s['capacity'])} "
                f"({_pct(s['used'], s['capacity'])})",
            ),
            (
                "LDs",
                f"{s['lds']}"
                + (f" ([yellow]{s['lds_degraded']} not normal[/])" if s["lds_degraded"] else ""),
            ),
            (
                "volumes",
                f"{s['volumes']}: {format_size(s['allocated'])} allocated of "
                f"{format_size(s['virtual'])} virtual (overcommit {_ratio(s.get('overcommit'))})",
            ),
            ("forecast", _status_forecast(s.get("forecasts") or {})),
            ("cache dirty", format_size(s["dirty_bytes"])),
            ("open alerts", f"[yellow]{s['open_alerts']}[/]" if s["open_alerts"] else "0"),
            ("rebuild", "running" if s["rebuild_running"] else "-"),
            *([("pair", _pair_health(s["pair"]))] if s.get("pair") else []),
        ],
        title="thinblock",
    )


# --- commands ------------------------------------------------------------------------------------


def _show(ctx: Context, value: Any, render: Callable[[Any], Any]) -> None:
    if ctx.json:
        ctx.print_json(value)
        return
    rendered = render(value)
    for table in rendered if isinstance(rendered, list) else [rendered]:
        ctx.print_table(table)


def render_iscsi_sessions(out: dict[str, Any]) -> Table:
    portal = out.get("portal")
    t = _table(
        "INITIATOR",
        "ADDRESS",
        "CONNS",
        "VV",
        "LUNS",
        "TYPE",
        "DIGESTS",
        "COMMANDS",
        "SINCE",
        title=f"iSCSI sessions ({portal})" if portal else "iSCSI sessions (the target is off)",
    )
    for s in out["sessions"]:
        digests = "+".join(k for k in ("header", "data") if s[f"{k}_digest"]) or "none"
        t.add_row(
            s["initiator"],
            ", ".join(s.get("addresses") or [s["address"]]),
            str(s.get("connections", 1)),
            s["vv"] or "-",
            ",".join(map(str, s["luns"])) or "-",
            s["session_type"],
            digests,
            str(s["commands"]),
            _time_text(s["since"]),
        )
    return t


def cmd_iscsi_sessions(ctx: Context) -> None:
    _show(ctx, ctx.call("GET", "/iscsi/sessions"), render_iscsi_sessions)


def cmd_node_list(ctx: Context) -> None:
    _show(ctx, ctx.call("GET", "/nodes"), render_nodes)


def cmd_node_failback(ctx: Context) -> None:
    # As long as the taken-over volumes' clients finish and their cache destages.
    done = ctx.call("POST", "/nodes/failback", timeout=_COPY_TIMEOUT)
    _done(ctx, done, f"handed back to their owner: {', '.join(done['volumes']) or 'no volumes'}")


def cmd_status(ctx: Context) -> None:
    _show(ctx, ctx.call("GET", "/status"), render_status)


def cmd_pd_add(ctx: Context) -> None:
    a = ctx.args
    path = a.path
    if not path.startswith("/") and _api_is_local(ctx.api):
        path = os.path.abspath(path)  # relative to where the administrator is, not the daemon
    body: dict[str, Any] = {"path": path}
    if a.size is not None:
        body["size"] = a.size
    if a.chunklet_size is not None:
        body["chunklet_size"] = a.chunklet_size
    if a.force:
        confirm = a.confirm
        if confirm is None and sys.stdin.isatty():
            ctx.err.print(
                f"Everything on {path} will be destroyed. Type its path to confirm: ", end="", markup=False
            )
            confirm = sys.stdin.readline().strip()
        body["force"] = True
        if confirm is not None:
            body["confirm"] = confirm
    _show(ctx, ctx.call("POST", "/pds", json=body), render_pd)


def cmd_pd_list(ctx: Context) -> None:
    _show(ctx, ctx.call("GET", "/pds"), render_pds)


def cmd_pd_show(ctx: Context) -> None:
    _show(ctx, ctx.call("GET", f"/pds/{ctx.args.id}"), render_pd)


def cmd_pd_fail(ctx: Context) -> None:
    pd_id = ctx.args.id
    if not ctx.args.yes and sys.stdin.isatty() and not ctx.json:
        pd = ctx.call("GET", f"/pds/{pd_id}")
        answer = input(
            f"fail PD {pd_id} ({pd['path']}, {pd['chunklets_used']} chunklet(s) in use)? Its LDs go degraded"
            " until a rebuild, pd restore or pd replace. [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            raise CliError("not failed")
    _show(ctx, ctx.call("POST", f"/pds/{pd_id}/fail"), render_pd)


# Restore and replace copy whole chunklets before they answer: minutes for large PDs.
_COPY_TIMEOUT = httpx.Timeout(None, connect=10.0)


def cmd_pd_restore(ctx: Context) -> None:
    pd = ctx.call("POST", f"/pds/{ctx.args.id}/restore", timeout=_COPY_TIMEOUT)
    _done(ctx, pd, f"PD {pd['id']} restored: resynchronised and back in service ({pd['health']})")


def cmd_pd_replace(ctx: Context) -> None:
    a = ctx.args
    pd = ctx.call("POST", f"/pds/{a.id}/replace", json={"new": a.new}, timeout=_COPY_TIMEOUT)
    _done(ctx, pd, f"PD {a.id} replaced by PD {pd['id']}: its LD members rebuilt there; PD {a.id} removed")


def cmd_pd_remove(ctx: Context) -> None:
    ctx.call("DELETE", f"/pds/{ctx.args.id}")
    _done(ctx, {"removed": "pd", "id": ctx.args.id}, f"removed PD {ctx.args.id}")


def cmd_pool_create(ctx: Context) -> None:
    a = ctx.args
    body: dict[str, Any] = {"name": a.name, "raid": a.raid}
    for key in ("set_size", "step", "region_size", "growth_increment", "growth_warning", "growth_limit"):
        if getattr(a, key) is not None:
            body[key] = getattr(a, key)
    _show(ctx, ctx.call("POST", "/pools", json=body), render_pool)


def cmd_pool_list(ctx: Context) -> None:
    _show(ctx, ctx.call("GET", "/pools"), render_pools)


def cmd_pool_show(ctx: Context) -> None:
    _show(ctx, ctx.call("GET", f"/pools/{_quote(ctx.args.name)}"), render_pool)


def cmd_pool_set(ctx: Context) -> None:
    a = ctx.args
    body: dict[str, Any] = {}
    if a.growth_increment is not None:
        body["growth_increment"] = a.growth_increment
    for key in ("growth_warning", "growth_limit"):
        if hasattr(a, key):
            body[key] = getattr(a, key)
    if not body:
        raise CliError(
            "nothing to change: give --growth-increment, --growth-warning or --growth-limit", EXIT_USAGE
        )
    _show(ctx, ctx.call("PATCH", f"/pools/{_quote(a.name)}", json=body), render_pool)


def cmd_pool_compact(ctx: Context) -> None:
    result = ctx.call("POST", f"/pools/{_quote(ctx.args.name)}/compact")
    if ctx.json:
        ctx.print_json(result)
        return
    n = result["released_lds"]
    ctx.say(f"pool {ctx.args.name!r}: released {n} LD{'s' if n != 1 else ''} back to free chunklets")
    ctx.print_table(render_pool(result["pool"]))


def cmd_pool_delete(ctx: Context) -> None:
    ctx.call("DELETE", f"/pools/{_quote(ctx.args.name)}")
    _done(ctx, {"deleted": "pool", "name": ctx.args.name}, f"deleted pool {ctx.args.name!r}")


_SNAPSHOT_SPACE_KEYS = ("snapshot_warning", "snapshot_limit", "snapshot_limit_policy")


def _snapshot_space_args(p: argparse.ArgumentParser, limit_type: Any, metavar: str, default: Any) -> None:
    """vv create and vv set: the snapshot space warning, limit and policy (3PAR's -snp_aw, -snp_al)."""
    p.add_argument(
        "--snapshot-warning",
        type=limit_type,
        metavar=metavar,
        default=default,
        help="alert when the space only its snapshots hold passes it",
    )
    p.add_argument(
        "--snapshot-limit",
        type=limit_type,
        metavar=metavar,
        default=default,
        help="cap the space only its snapshots hold (see --snapshot-limit-policy)",
    )
    p.add_argument(
        "--snapshot-limit-policy",
        choices=("fail", "invalidate-oldest"),
        default=default,
        help="at the limit, a write needing a copy on write: fails with ENOSPC (fail, the default),"
        " or deletes the oldest snapshot and goes on (invalidate-oldest)",
    )


def cmd_vv_create(ctx: Context) -> None:
    a = ctx.args
    body: dict[str, Any] = {"name": a.name, "pool": a.pool, "size": a.size}
    if a.alloc_warning is not None:
        body["alloc_warning"] = a.alloc_warning
    if a.alloc_limit is not None:
        body["alloc_limit"] = a.alloc_limit
    if a.cache is not None:
        body["cache_mode"] = a.cache
    if a.node is not None:
        body["node"] = a.node
    for key in _SNAPSHOT_SPACE_KEYS:
        if getattr(a, key) is not None:
            body[key] = getattr(a, key)
    _show(ctx, ctx.call("POST", "/volumes", json=body), render_vv)


def cmd_vv_move(ctx: Context) -> None:
    a = ctx.args
    # As long as the copy takes: the daemon answers once the partner serves the volume.
    moved = ctx.call("POST", f"/volumes/{_quote(a.name)}/move", json={"to": a.to}, timeout=_COPY_TIMEOUT)
    _done(
        ctx,
        moved,
        f"moved volume {a.name!r} from {moved['source']} to {moved['target']}:"
        f" {format_size(moved['copied_bytes'])} copied and verified in {moved['seconds']:.1f} s",
    )


def cmd_vv_list(ctx: Context) -> None:
    vvs = ctx.call("GET", "/volumes")
    if ctx.args.pool:
        ctx.call("GET", f"/pools/{_quote(ctx.args.pool)}")  # "pool 'x' not found" rather than nothing
        vvs = [v for v in vvs if v["pool"] == ctx.args.pool]
    _show(ctx, vvs, render_vvs)


def cmd_vv_show(ctx: Context) -> None:
    _show(ctx, ctx.call("GET", f"/volumes/{_quote(ctx.args.name)}"), render_vv)


def cmd_vv_set(ctx: Context) -> None:
    a = ctx.args
    body: dict[str, Any] = {}
    for key in ("alloc_warning", "alloc_limit", *_SNAPSHOT_SPACE_KEYS):
        if hasattr(a, key):
            body[key] = getattr(a, key)
    if a.cache is not None:
        body["cache_mode"] = a.cache
    if not body:
        raise CliError(
            "nothing to change: give --alloc-warning, --alloc-limit, --cache, --snapshot-warning,"
            " --snapshot-limit or --snapshot-limit-policy",
            EXIT_USAGE,
        )
    _show(ctx, ctx.call("PATCH", f"/volumes/{_quote(a.name)}", json=body), render_vv)


def cmd_vv_access(ctx: Context) -> None:
    a = ctx.args
    path = f"/volumes/{_quote(a.name)}/access"
    if a.action == "show":
        if a.client is not None or a.read_only:
            raise CliError("show takes no client: give allow, deny or remove before it", EXIT_USAGE)
        access = ctx.call("GET", path)
    else:
        if a.client is None:
            raise CliError(
                f"{a.action} needs a client (CN=..., psk:NAME, an address or network, unix, *)", EXIT_USAGE
            )
        if a.read_only and a.action != "allow":
            raise CliError("--read-only goes with allow", EXIT_USAGE)
        if a.action == "remove":
            access = ctx.call("GET", path)
            ids = [
                r["id"] for r in access["rules"] if r["source"] == "api" and r["client"] == a.client.strip()
            ]
            if not ids:
                fixed = any(r["client"] == a.client.strip() for r in access["rules"])
                why = " (it is in the configuration file: change it there)" if fixed else ""
                raise CliError(f"volume {a.name} has no access rule for {a.client} to remove{why}")
            for rule_id in ids:
                ctx.call("DELETE", f"{path}/{rule_id}")
            access = ctx.call("GET", path)
        else:
            mode = "deny" if a.action == "deny" else ("ro" if a.read_only else "rw")
            access = ctx.call("POST", path, json={"client": a.client, "mode": mode})
    render_access(ctx, access)


def render_access(ctx: Context, access: dict[str, Any]) -> None:
    if ctx.json:
        ctx.print_json(access)
        return
    rules = access["rules"]
    if not access["restricted"] and not rules:
        ctx.say(f"{access['volume']}: no access rule; every NBD client may open it read-write")
        return
    table = _table("CLIENT", "MODE", "RULE FOR", "FROM", title=f"NBD access to {access['volume']}")
    for rule in rules:
        source = "config" if rule["source"] == "config" else f"api #{rule['id']}"
        table.add_row(rule["client"], rule["mode"], rule["volume"], source)
    ctx.print_table(table)
    if not access["restricted"]:
        ctx.say("clients no rule denies may open it read-write")


def cmd_vv_grow(ctx: Context) -> None:
    relative, size = ctx.args.size
    path = f"/volumes/{_quote(ctx.args.name)}"
    if relative:
        size += ctx.call("GET", path)["size"]
    _show(ctx, ctx.call("POST", f"{path}/grow", json={"size": size}), render_vv)


def cmd_vv_rename(ctx: Context) -> None:
    a = ctx.args
    renamed = ctx.call("POST", f"/volumes/{_quote(a.name)}/rename", json={"name": a.new_name})
    _done(
        ctx,
        renamed,
        f"volume '{a.name}' renamed to '{renamed['name']}'; its NBD export is now {renamed['name']}",
    )


def cmd_vv_snapshot(ctx: Context) -> None:
    a = ctx.args
    _show(ctx, ctx.call("POST", f"/volumes/{_quote(a.name)}/snapshots", json={"name": a.snapshot}), render_vv)


def cmd_vv_revert(ctx: Context) -> None:
    a = ctx.args
    body = {"snapshot": a.snapshot, "force": bool(a.force)}
    _show(ctx, ctx.call("POST", f"/volumes/{_quote(a.name)}/revert", json=body), render_vv)


def cmd_vv_diff(ctx: Context) -> None:
    a = ctx.args
    diff = ctx.call("GET", f"/volumes/{_quote(a.target)}/diff", params={"base": a.base})
    if ctx.json:
        ctx.print_json(diff)
        return
    ctx.say(
        f"{a.target} against {a.base}: {format_size(diff['bytes'])} differ in {len(diff['extents'])} range(s)"
    )
    if not diff["extents"]:
        return
    table = _table("OFFSET", "LENGTH")
    for extent in diff["extents"]:
        table.add_row(str(extent["offset"]), format_size(extent["length"]))
    ctx.print_table(table)


def cmd_vv_clone(ctx: Context) -> None:
    a = ctx.args
    _show(ctx, ctx.call("POST", f"/volumes/{_quote(a.snapshot)}/clones", json={"name": a.clone}), render_vv)


def cmd_vv_delete(ctx: Context) -> None:
    name = ctx.args.name
    if not ctx.args.yes and sys.stdin.isatty() and not ctx.json:
        vv = ctx.call("GET", f"/volumes/{_quote(name)}")
        answer = input(
            f"delete volume {name!r} ({format_size(vv['size'])}, {format_size(vv['allocated'])} of data)? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            raise CliError("not deleted")
    params = {"force": "true"} if ctx.args.force else None
    ctx.call("DELETE", f"/volumes/{_quote(name)}", params=params)
    _done(ctx, {"deleted": "volume", "name": name}, f"deleted volume {name!r}")


def cmd_alerts(ctx: Context) -> None:
    alerts = ctx.call("GET", "/alerts", params={"all": "true" if ctx.args.all else "false"})
    if ctx.json:
        ctx.print_json(alerts)
    elif not alerts:
        ctx.say("no alerts" if ctx.args.all else "no open alerts")
    else:
        ctx.print_table(render_alerts(alerts))


def cmd_alert_ack(ctx: Context) -> None:
    alert = ctx.call("POST", f"/alerts/{ctx.args.id}/ack")
    _done(ctx, alert, f"alert {alert['id']} ({alert['kind']} on {alert['object']}) acknowledged")


def cmd_ld_list(ctx: Context) -> None:
    params = {"pool": ctx.args.pool} if ctx.args.pool else None
    _show(ctx, ctx.call("GET", "/lds", params=params), render_lds)


def cmd_ld_show(ctx: Context) -> None:
    _show(ctx, ctx.call("GET", f"/lds/{ctx.args.id}"), render_ld)


def cmd_rebuild(ctx: Context) -> None:
    progress = ctx.call("POST", "/rebuild")
    if not ctx.args.no_wait:
        progress = _follow_rebuild(ctx, progress)
    if progress.get("error"):
        raise CliError(f"rebuild failed: {progress['error']}")
    if ctx.json:
        ctx.print_json(progress)
    elif ctx.args.no_wait and progress["running"]:
        ctx.say("rebuild started; follow it with `thinblock rebuild` or `thinblock ld list`")
    elif progress["lds_total"] == 0:
        ctx.say("nothing to rebuild: no LD is degraded")
    else:
        ctx.say(
            f"rebuilt {progress['lds_done']} of {progress['lds_total']} LDs "
            f"({format_size(progress['bytes_done'])})"
        )


def cmd_token_create(ctx: Context) -> None:
    a = ctx.args
    created = ctx.call("POST", "/tokens", json={"name": a.name, "role": a.role})
    if a.output:
        try:
            fd = os.open(a.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            # The token exists now; without its secret it is useless: revoke it, say so.
            ctx.call("DELETE", f"/tokens/{created['id']}")
            raise CliError(
                f"cannot create {a.output}: {exc.strerror or exc} (the token was revoked)"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(created["token"] + "\n")
        shown = {k: v for k, v in created.items() if k != "token"}
        _done(
            ctx, shown, f"token {created['id']} ({created['name']}, {created['role']}) written to {a.output}"
        )
        return
    if ctx.json:
        ctx.print_json(created)
        return
    ctx.say(f"token {created['id']} ({created['name']}, {created['role']}); its secret, shown this once:")
    ctx.say(created["token"])


def cmd_token_list(ctx: Context) -> None:
    tokens = ctx.call("GET", "/tokens")
    if ctx.json:
        ctx.print_json(tokens)
        return
    table = _table("ID", "NAME", "ROLE", "CREATED")
    for t in tokens:
        table.add_row(str(t["id"]), t["name"], t["role"], _time_text(t["created"]))
    ctx.print_table(table)


def cmd_token_revoke(ctx: Context) -> None:
    ctx.call("DELETE", f"/tokens/{ctx.args.id}")
    _done(ctx, None, f"token {ctx.args.id} revoked")


def _follow_rebuild(ctx: Context, progress: dict[str, Any]) -> dict[str, Any]:
    show_bar = ctx.err.is_terminal and not ctx.json
    with contextlib.ExitStack() as stack:
        bar: Progress | None = None
        task = None
        if show_bar:
            bar = stack.enter_context(
                Progress(
                    TextColumn("rebuild"),
                    BarColumn(),
                    DownloadColumn(binary_units=True),
                    TaskProgressColumn(),
                    TimeRemainingColumn(),
                    console=ctx.err,
                    transient=False,
                )
            )
            task = bar.add_task("rebuild", total=progress["bytes_total"] or None)
        while progress["running"]:
            if bar is not None and task is not None:
                bar.update(task, total=progress["bytes_total"] or None, completed=progress["bytes_done"])
            time.sleep(0.2)
            progress = ctx.call("GET", "/rebuild")
        if bar is not None and task is not None:
            bar.update(task, total=progress["bytes_total"] or 1, completed=progress["bytes_done"] or 1)
    return progress


def _done(ctx: Context, value: Any, message: str) -> None:
    if ctx.json:
        ctx.print_json(value)
    else:
        ctx.say(message)


# --- import / export: nbdcopy over the daemon's NBD export ---------------------------------------
#
# The copy runs through NBD, the same path a host takes, with libnbd's nbdcopy (Debian
# libnbd-bin): it uses several connections and requests in flight, reads the source's
# block status to skip holes, detects zero blocks (-S) and sends them as WRITE_ZEROES that
# the volume turns into nothing (zero detect), or skips them outright when the volume holds
# no data yet (--destination-is-zero); it flushes at the end (--flush) and reports progress
# on a file descriptor we read.  A client of our own would re-implement all of that.


def _is_nbd_uri(text: str) -> bool:
    return text.startswith(("nbd://", "nbds://", "nbd+unix://", "nbds+unix://", "nbd+vsock://"))


def _api_is_local(api: str) -> bool:
    host = urllib.parse.urlsplit(api).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _volume_uri(ctx: Context, vv: dict[str, Any]) -> str:
    override = getattr(ctx.args, "nbd", None)
    if override:
        if not _is_nbd_uri(override):
            raise CliError(f"--nbd: not an NBD URI: {override!r} (e.g. nbd://127.0.0.1:10809)", EXIT_USAGE)
        parts = urllib.parse.urlsplit(override)
        if parts.scheme.endswith("+unix"):
            return urllib.parse.urlunsplit((parts.scheme, "", "/" + _quote(vv["name"]), parts.query, ""))
        return f"{parts.scheme}://{parts.netloc}/{_quote(vv['name'])}"
    uri = vv.get("export_uri")
    if not uri:
        raise CliError("the daemon reports no NBD address for this volume; give --nbd URI")
    parts = urllib.parse.urlsplit(uri)
    if parts.hostname in ("0.0.0.0", "::"):  # listening everywhere: reach it where the API is
        api_host = urllib.parse.urlsplit(ctx.api).hostname or "127.0.0.1"
        host = f"[{api_host}]" if ":" in api_host else api_host
        uri = urllib.parse.urlunsplit((parts.scheme, f"{host}:{parts.port}", parts.path, parts.query, ""))
    return uri


def _nbdcopy() -> str:
    path = shutil.which("nbdcopy")
    if path is None:
        raise CliError("nbdcopy not found: install libnbd-bin (Debian: apt-get install libnbd-bin)")
    return path


def _image_size(source: str) -> int:
    if _is_nbd_uri(source):
        nbdinfo = shutil.which("nbdinfo")
        if nbdinfo is None:
            raise CliError("nbdinfo not found: install libnbd-bin (Debian: apt-get install libnbd-bin)")
        result = subprocess.run([nbdinfo, "--size", source], capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "nbdinfo failed"
            raise CliError(f"cannot open {source}: {reason}")
        return int(result.stdout.strip())
    try:
        st = os.stat(source)
    except OSError as exc:
        raise CliError(f"cannot open {source}: {exc.strerror}") from None
    if stat.S_ISBLK(st.st_mode):
        with open(source, "rb") as f:
            return f.seek(0, os.SEEK_END)
    if not stat.S_ISREG(st.st_mode):
        raise CliError(f"{source} is neither a file, a block device nor an nbd:// URI")
    return st.st_size


def _run_nbdcopy(ctx: Context, options: list[str], source: str, dest: str, total: int, label: str) -> float:
    """Run nbdcopy with a progress bar on a terminal; the seconds it took.  Raises CliError."""
    show_bar = ctx.err.is_terminal and not ctx.json
    read_fd, write_fd = os.pipe()
    cmd = [_nbdcopy(), "--flush", f"--progress={write_fd}", *options, "--", source, dest]
    started = time.monotonic()
    with tempfile.TemporaryFile(mode="w+") as errors:
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors, pass_fds=(write_fd,)
            )
        finally:
            os.close(write_fd)
        with os.fdopen(read_fd, "r") as progress_lines, contextlib.ExitStack() as stack:
            bar: Progress | None = None
            task = None
            if show_bar:
                bar = stack.enter_context(
                    Progress(
                        TextColumn(label),
                        BarColumn(),
                        DownloadColumn(binary_units=True),
                        TaskProgressColumn(),
                        TimeRemainingColumn(),
                        console=ctx.err,
                    )
                )
                task = bar.add_task(label, total=total or 1)
            try:
                for line in _lines(progress_lines):
                    percent = _parse_progress(line)
                    if bar is not None and task is not None and percent is not None:
                        bar.update(task, completed=(total or 1) * percent // 100)
                rc = proc.wait()
            except KeyboardInterrupt:
                proc.terminate()
                proc.wait()
                raise
        if rc != 0:
            errors.seek(0)
            lines = [ln.strip() for ln in errors.read().splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"nbdcopy exited with status {rc}"
            raise CliError(f"copy failed: {reason.removeprefix('nbdcopy: ')}")
    return time.monotonic() - started


def _lines(f: IO[str]) -> Iterator[str]:
    while True:
        line = f.readline()
        if not line:
            return
        yield line


def _parse_progress(line: str) -> int | None:
    """nbdcopy --progress=FD writes ``N/100`` lines."""
    head, _, _ = line.strip().partition("/")
    return int(head) if head.isdigit() else None


def _image_format(source: str) -> str:
    """The format qemu-img sees in ``source`` (raw, qcow2, vmdk, vdi, vhdx, luks...)."""
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        raise CliError(
            "qemu-img not found: it checks that SOURCE is a raw image (Debian: apt-get install "
            "qemu-utils); give --format raw to copy it without that check"
        )
    result = subprocess.run(
        [qemu_img, "info", "--output=json", source], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise CliError(f"cannot open {source}: {lines[-1] if lines else 'qemu-img info failed'}")
    try:
        return str(json.loads(result.stdout)["format"])
    except (ValueError, KeyError, TypeError):
        raise CliError(f"qemu-img info gave no format for {source}") from None


def cmd_vv_import(ctx: Context) -> None:
    a = ctx.args
    vv = ctx.call("GET", f"/volumes/{_quote(a.name)}")
    target = _volume_uri(ctx, vv)
    if a.format != "raw":
        # A qcow2 (or any container) copied byte for byte gives a volume no guest can boot: the
        # container's header and tables, not the disk it describes.
        fmt = _image_format(a.source)
        if fmt != "raw":
            raise CliError(
                f"{a.source} is a {fmt} image, not a raw disk: convert it first "
                f"(qemu-img convert -f {fmt} -O raw {a.source} disk.raw) or, to copy its {fmt} "
                "bytes as they are, give --format raw"
            )
    size = _image_size(a.source)
    if size > vv["size"]:
        raise CliError(
            f"{a.source} ({format_size(size)}) is larger than volume {a.name!r} ({format_size(vv['size'])}): "
            f"grow it first: thinblock vv grow {a.name} {_size_for_command(size)}"
        )
    if (vv["regions_allocated"] or vv["dirty_bytes"]) and not a.force:
        raise CliError(
            f"volume {a.name!r} holds data ({format_size(vv['allocated'])} allocated): "
            "give --force to overwrite it"
        )
    options = []
    if vv["regions_allocated"] == 0 and vv["dirty_bytes"] == 0:
        # Nothing written yet: every block reads zeros already, so zero blocks need not be sent at all.
        options.append("--destination-is-zero")
    seconds = _run_nbdcopy(ctx, options, a.source, target, size, f"import {a.name}")
    after = ctx.call("GET", f"/volumes/{_quote(a.name)}")
    result = {
        "volume": a.name,
        "source": a.source,
        "bytes": size,
        "allocated": after["allocated"],
        "seconds": round(seconds, 3),
    }
    _done(
        ctx,
        result,
        f"imported {format_size(size)} from {a.source} into {a.name!r} in {seconds:.1f}s: "
        f"{format_size(after['allocated'])} allocated",
    )


def cmd_vv_export(ctx: Context) -> None:
    a = ctx.args
    vv = ctx.call("GET", f"/volumes/{_quote(a.name)}")
    source = _volume_uri(ctx, vv)
    if not _is_nbd_uri(a.dest) and a.dest != "-":
        dest = Path(a.dest)
        if dest.is_dir():
            raise CliError(f"{a.dest} is a directory; give a file name")
        if dest.is_file() and dest.stat().st_size > 0 and not a.force:
            raise CliError(f"{a.dest} exists; give --force to overwrite it")
        if dest.is_file():
            dest.unlink()  # nbdcopy writes into a file; a stale longer tail must not survive
    seconds = _run_nbdcopy(ctx, [], source, a.dest, vv["size"], f"export {a.name}")
    result = {"volume": a.name, "dest": a.dest, "bytes": vv["size"], "seconds": round(seconds, 3)}
    _done(ctx, result, f"exported {a.name!r} ({format_size(vv['size'])}) to {a.dest} in {seconds:.1f}s")


# --- local commands ------------------------------------------------------------------------------


def cmd_serve(ctx: Context) -> int:
    from .config import ConfigError, apply_overrides, load_config
    from .daemon import serve

    a = ctx.args
    try:
        cfg = load_config(a.config)
        cfg = apply_overrides(
            cfg,
            data_dir=a.data,
            metadata=a.metadata or os.environ.get("THINBLOCK_METADATA") or None,
            nbd=a.nbd,
            nbd_unix=a.nbd_unix,
            iscsi=a.iscsi,
            api=a.api,
            api_token=a.api_token or os.environ.get("THINBLOCK_API_TOKEN") or None,
            log_level=a.log_level,
            log_format=a.log_format,
            default_export=a.default_export,
            chunklet_size=a.chunklet_size,
            max_dirty_bytes=a.max_dirty,
            webhook_url=a.webhook_url,
            first_start_pd_size=a.first_start_pd_size,
            pd_allowed_roots=a.pd_allowed_root,
            first_start=False if a.no_first_start else None,
            node_name=a.node,
            partner=a.partner,
            mirror_listen=a.mirror_listen,
            partner_timeout=a.partner_timeout,
            partner_data=a.partner_data,
            partner_service=a.partner_service,
            partner_metadata=a.partner_metadata,
            partner_api=a.partner_api,
            partner_api_token_file=a.partner_api_token_file,
            lease_ttl=a.lease_ttl,
            fence_margin=a.fence_margin,
        ).validate()
    except ConfigError as exc:
        raise CliError(f"configuration: {exc}", EXIT_USAGE) from None
    return serve(cfg)


def cmd_completion(ctx: Context) -> None:
    import argcomplete

    # argcomplete's script calls `thinblock` back with _ARGCOMPLETE set; main() answers it.
    ctx.out.file.write(argcomplete.shellcode(["thinblock"], shell=ctx.args.shell))


def cmd_check(ctx: Context) -> int:
    from .config import ConfigError, load_config
    from .engine import Engine
    from .metadata import redact_url, sqlite_dir

    a = ctx.args
    try:
        cfg = load_config(a.config)
    except ConfigError as exc:
        raise CliError(f"configuration: {exc}", EXIT_USAGE) from None
    data_dir = Path(a.data) if a.data else cfg.data_dir
    metadata = a.metadata or os.environ.get("THINBLOCK_METADATA") or cfg.metadata
    if metadata and metadata.startswith("sqlite:") and metadata != "sqlite:":
        data_dir = sqlite_dir(metadata, data_dir)
        metadata = None
    if not metadata and not data_dir.is_dir():
        raise CliError(f"no data directory at {data_dir}")
    where = redact_url(metadata) if metadata else str(data_dir)
    try:
        report = Engine.check(data_dir, metadata)
    except Exception as exc:  # a store that cannot even be read is a failed check, said in one line
        raise CliError(f"cannot check {where}: {exc}") from None
    if ctx.json:
        ctx.print_json({"ok": report.ok, "problems": list(report.problems), "counts": dict(report.counts)})
    else:
        ctx.out.print(f"[bold]{where}[/]: " + ("[green]ok[/]" if report.ok else "[red]NOT OK[/]"))
        for key, value in sorted(report.counts.items()):
            ctx.say(f"  {key}: {value}")
        for problem in report.problems:
            ctx.say(f"  problem: {problem}")
    return EXIT_OK if report.ok else EXIT_ERROR


def cmd_metadata_copy(ctx: Context) -> int:
    from .errors import ThinblockError
    from .metadata import redact_url
    from .metadata.copy import copy_store

    a = ctx.args
    try:
        report = copy_store(a.source, a.target)
    except ThinblockError as exc:
        raise CliError(f"metadata copy: {exc}") from None
    if ctx.json:
        ctx.print_json({"source": report.source, "target": report.target, "counts": report.counts})
    else:
        ctx.out.print(
            f"copied {report.source} -> {redact_url(report.target)}: [green]checked ok on both sides[/]"
        )
        for key, value in sorted(report.counts.items()):
            ctx.say(f"  {key}: {value}")
        ctx.say(
            f"serve it with: thinblock serve --data {a.source.removeprefix('sqlite:') or '.'}"
            f" --metadata {redact_url(report.target)}"
        )
    return EXIT_OK


# --- entry point ---------------------------------------------------------------------------------


def main(
    argv: Sequence[str] | None = None,
    *,
    transport: httpx.BaseTransport | None = None,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """The ``thinblock`` command; returns the exit status.  ``transport`` and the streams are for tests."""
    out_stream = stdout or sys.stdout
    err_stream = stderr or sys.stderr
    parser = build_parser()
    if argv is None and "_ARGCOMPLETE" in os.environ:  # a shell asking for completions
        import argcomplete

        argcomplete.autocomplete(parser)  # prints them and exits
    arguments = list(sys.argv[1:] if argv is None else argv)
    for word in arguments:
        if _NEGATIVE_SIZE.match(word):
            err_stream.write(f"error: a size cannot be negative: {word} (see thinblock --help)\n")
            return EXIT_USAGE
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # --help, --version, usage errors (argparse printed them)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    # Not a terminal (a pipe, a file, a test): tables as wide as their content, never cut.
    out = Console(file=out_stream, width=None if out_stream.isatty() else 300)
    err = Console(file=err_stream, stderr=stderr is None)
    ctx = Context(args=args, out=out, err=err, transport=transport)
    try:
        result = args.func(ctx)
        return result if isinstance(result, int) else EXIT_OK
    except CliError as exc:
        _fail_line(err_stream, str(exc))
        return exc.status
    except KeyboardInterrupt:
        _fail_line(err_stream, "interrupted")
        return 130
    except BrokenPipeError:  # `thinblock vv list | head`
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keep the interpreter from complaining at exit
        return EXIT_OK
    except Exception as exc:
        if os.environ.get("THINBLOCK_DEBUG"):
            raise
        _fail_line(
            err_stream, f"unexpected {type(exc).__name__}: {exc} (THINBLOCK_DEBUG=1 shows the traceback)"
        )
        return EXIT_ERROR
    finally:
        ctx.close()


def _fail_line(stream: IO[str], message: str) -> None:
    text = " ".join(message.split())
    while text.lower().startswith("error:"):  # a tool's own "error: ..." is not said twice
        text = text[len("error:") :].lstrip()
    stream.write(f"error: {text}\n")
    stream.flush()
