"""A planned move of one volume to the partner node (issue 12, step 6): ``thinblock vv move``.

Why a copy and not an ownership switch: each node of a pair has its own data directory (PDs)
and its own metadata store, and a volume's regions live in its node's pools, recorded in its
node's store.  There is no shared store in which an "owner" column could be switched (a takeover
opens the dead partner's *whole* data directory and store, never one volume of it).  So a move
hands the data over: the volume is drained on this node (the source), its assigned regions are
copied to a volume made for it on the partner (the target) under a temporary name, read back and
compared there, and then the name switches nodes.

The switch is ordered so that a crash (kill -9) of either node at any point leaves exactly one
complete copy that serves the name, once the nodes run again::

  source: journal COPYING (durable)  -- a crash from here to SWITCHING rolls back: the source
          gate the name (NBD/iSCSI: "no such export/target"), disconnect its sessions, flush
  target: journal INCOMING, create TEMP (hidden from hosts), write the regions, flush, checksums
  source: compare the checksums; journal SWITCHING (durable) -- from here a restart rolls forward:
          the source never serves the name again
  target: apply cache mode, limits and access rules; rename TEMP -> NAME (it serves it now);
          journal FINISHED (the VV's creation time tells a finished rename after a crash)
  source: delete NAME; drop the journal record

A restarted source reads its journal before its NBD and iSCSI servers start: a SWITCHING record
keeps the name gated until the target confirms the rename (retried while the partner is down: the
verified copy is then on the partner, the name is served by nobody until it answers); a COPYING
record ungates at once (this node serves) and deletes the partial copy on the partner when it
can.  The target keeps its records (a few hundred bytes each) so that a finish repeated after a
crash is answered "finished", never done twice.

The two nodes talk over the partner's REST API (``node.partner_api``; node/partner_api.py), not
the mirror link: the move is an administrative operation made of the API's own verbs (create,
rename, delete, access rules) plus three for the data, and it inherits the API's authentication,
roles, audit and error answers.  The mirror link stays the hot path of write-back writes.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import google_crc32c

from thinblock.blockdev import ExtentFlags, Volume, VolumeProvider
from thinblock.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, OutOfSpace, ThinblockError
from thinblock.model import CacheMode
from thinblock.privatefile import replace_json
from thinblock.units import KiB, Limit, format_size

if TYPE_CHECKING:
    from thinblock.engine import Engine

log = logging.getLogger("thinblock.move")

OUTGOING_FILE = "moves.json"
INCOMING_FILE = "moves-incoming.json"
# One piece of a copy: one API request (base64 in JSON stays under the API's 1 MiB body limit).
PIECE = 512 * KiB
BLOCK_STATUS_SPAN = 1 << 40  # bytes asked per block-status call (it answers at most 1,024 extents)
DRAIN_TIMEOUT = 10.0  # seconds for disconnected sessions to end before the move is refused
RETRY_INTERVAL = 2.0  # seconds between attempts to reach the partner when finishing a move


class PartnerUnavailable(ThinblockError):
    """The partner's API cannot be reached, or answered something the move cannot use."""

    http_status = 503


class MoveState(StrEnum):
    COPYING = "copying"  # source: drained, copy under way; a restart rolls back
    SWITCHING = "switching"  # source: verified; a restart rolls forward
    INCOMING = "incoming"  # target: TEMP exists (or is being made), hidden from hosts
    FINISHED = "finished"  # target: TEMP renamed to the volume's name


@dataclass
class MoveRecord:
    id: str
    vv: str  # the volume's name
    temp: str  # its name on the target until the switch
    state: MoveState
    partner: str = ""  # source: the target node's name
    started: float = field(default_factory=time.time)
    created: float | None = None  # target: TEMP's creation time (identifies it after the rename)
    # source, from SWITCHING: the settings the target gives the volume (a restart sends them again)
    spec: dict[str, Any] | None = None


class MoveJournal:
    """The durable records of one side's moves: a small JSON file in the data directory, replaced
    whole and fsynced (privatefile.replace_json) at every state change, so a crash leaves the
    state before or after the change, never a mix."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[str, MoveRecord] = {}
        if path.exists():
            try:
                doc = json.loads(path.read_text())
                for raw in doc["moves"]:
                    raw["state"] = MoveState(raw["state"])
                    record = MoveRecord(**raw)
                    self.records[record.id] = record
            except (OSError, ValueError, KeyError, TypeError) as exc:
                # Serving without it could serve a name on both nodes: stop the start instead.
                raise RuntimeError(f"cannot read the move journal {path}: {exc}") from None

    def put(self, record: MoveRecord) -> None:
        self.records[record.id] = record
        self._save()

    def drop(self, move_id: str) -> None:
        if self.records.pop(move_id, None) is not None:
            self._save()

    def of_volume(self, name: str) -> MoveRecord | None:
        return next((r for r in self.records.values() if r.vv == name), None)

    def _save(self) -> None:
        replace_json(self.path, {"moves": [asdict(r) for r in self.records.values()]})


class VolumeGate:
    """The engine as the hosts' front ends see it (NBD, iSCSI), minus the volumes in a move: a
    moving volume is answered as absent (NBD_REP_ERR_UNKNOWN to NBD_OPT_GO; iSCSI login "target
    not found"), which is what a host gets for a volume this node does not serve: qemu's
    ``reconnect-delay`` and iscsid retry, and find it on the node that serves it once the move
    is done.  The API and the move itself use the engine directly."""

    def __init__(self, inner: VolumeProvider) -> None:
        self.inner = inner
        self.hidden: set[str] = set()

    def export_names(self) -> list[str]:
        return [n for n in self.inner.export_names() if n not in self.hidden]

    def open_volume(self, name: str) -> Volume:
        if name in self.hidden:
            raise NotFound(f"volume '{name}' is being moved")
        return self.inner.open_volume(name)


# --- the checksums both sides compute ----------------------------------------------------------


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return int(google_crc32c.value(bytes(data)))


def encode_piece(data: bytes | bytearray | memoryview) -> str:
    return base64.b64encode(data).decode()


def decode_piece(text: str, crc: int) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("data is not base64") from None
    if crc32c(data) != crc:
        raise InvalidArgument("data does not match its crc32c (damaged in transit)")
    return data


# --- the engine's side, as the move needs it ---------------------------------------------------


@dataclass(frozen=True)
class VolumeSpec:
    """What the target's volume is made with (the source's settings)."""

    size: int
    pool: str
    cache_mode: str
    alloc_warning: str | None  # "80%" or a byte count, as the API takes them
    alloc_limit: str | None
    access: list[tuple[str, str]]  # (client, mode) of the access rules made through the API
    snapshot_warning: str | None = None  # the snapshot space settings (volume/snapshots.py)
    snapshot_limit: str | None = None
    snapshot_limit_policy: str = "fail"


class Partner(Protocol):
    """The target node as the source sees it (node/partner_api.PartnerAPI over HTTP; tests
    connect an IncomingMoves directly)."""

    async def name(self) -> str: ...
    async def prepare(self, move_id: str, vv: str, temp: str, spec: VolumeSpec, needed: int) -> None: ...
    async def write(self, move_id: str, offset: int, data: bytes) -> None: ...
    async def checksums(self, move_id: str, pieces: list[tuple[int, int]]) -> list[int]: ...
    async def finish(self, move_id: str, spec: VolumeSpec) -> None: ...
    async def abort(self, move_id: str) -> None: ...


def pieces_of(extents: Iterable[tuple[int, int]], piece: int = PIECE) -> Iterator[tuple[int, int]]:
    for offset, length in extents:
        end = offset + length
        while offset < end:
            n = min(piece, end - offset)
            yield offset, n
            offset += n


async def allocated_extents(volume: Any) -> list[tuple[int, int]]:
    """The volume's assigned byte ranges (block status ALLOCATED): only these are copied; the
    rest reads as zeros on both nodes (thin: unwritten space stays unwritten)."""
    out: list[tuple[int, int]] = []
    pos, size = 0, volume.size
    while pos < size:
        extents = await volume.block_status(pos, min(BLOCK_STATUS_SPAN, size - pos))
        assert extents, "block status answered no extent"
        for extent in extents:
            if extent.flags == ExtentFlags.ALLOCATED:
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + extent.length)
                else:
                    out.append((pos, extent.length))
            pos += extent.length
    return out


def pool_room(engine: Engine, pool_name: str) -> int:
    """Bytes of new regions the pool may still get: its free regions, plus what its growth may
    add from the PDs' free chunklets (at the RAID level's share of data), up to its growth limit."""
    pool = engine.get_pool(pool_name)
    free_chunklets = sum(
        pd.chunklets_free * pd.chunklet_size for pd in engine.list_pds() if str(pd.health) != "failed"
    )
    if pool.raid == 1:
        share = 1 / pool.set_size
    elif pool.raid == 5:
        share = (pool.set_size - 1) / pool.set_size
    else:
        share = 1.0
    room = pool.free + int(free_chunklets * share)
    if pool.growth_limit is not None:
        room = min(room, pool.growth_limit - pool.used)
    return max(room, 0)


@dataclass
class MoveResult:
    vv: str
    source: str
    target: str
    size: int
    copied_bytes: int
    pieces: int
    seconds: float


# Tests: raise a BaseException (not an Exception) at a named step to play a kill -9 there.
CrashHook = Callable[[str], None]


def _no_crash(step: str) -> None:
    return None


# --- the source ------------------------------------------------------------------------------


class Mover:
    """The source side of moves: ``move`` runs one; ``recover`` (at start, before the host front
    ends) settles what a crash left."""

    def __init__(
        self,
        engine: Engine,
        partner: Partner | None,
        journal: MoveJournal,
        gate: VolumeGate,
        *,
        node_name: str,
        access: Any = None,  # nbd.access.AccessStore: the API-made rules travel with the volume
        config_rules: Callable[[str], str] = lambda name: "",
        crash: CrashHook = _no_crash,
    ) -> None:
        self.engine = engine
        self.partner = partner
        self.journal = journal
        self.gate = gate
        self.node_name = node_name
        self.access = access
        self.config_rules = config_rules
        self.crash = crash
        self._tasks: set[asyncio.Task[None]] = set()
        self.busy: set[str] = set()

    # -- refusals: one clear line each, before anything changes --------------------------------
    async def _check(self, name: str, to: str) -> tuple[Partner, str, Any]:
        info = self.engine.get_vv(name)  # NotFound
        if to == self.node_name:
            raise InvalidArgument(f"volume '{name}' is already on node {to}")
        if self.partner is None:
            raise Conflict("this node has no partner to move a volume to (node.partner_api is not set)")
        try:
            partner_name = await self.partner.name()
        except PartnerUnavailable as exc:
            raise PartnerUnavailable(f"cannot move volume '{name}': the partner is down ({exc})") from None
        if to != partner_name:
            raise InvalidArgument(
                f"node {to!r} is not this pair's: the nodes are {self.node_name} and {partner_name}"
            )
        if name in self.busy or self.journal.of_volume(name) is not None:
            raise Conflict(f"volume '{name}' is already being moved")
        if info.kind != "volume" or info.parent or info.children:
            raise Conflict(
                f"volume '{name}' has snapshots or clones (or is one): a move copies one volume; "
                "delete its snapshots and clones first (or export it and import it on the partner)"
            )
        rules = self.config_rules(name)
        if rules:
            raise Conflict(
                f"volume '{name}' is named by {rules} in this node's configuration: they would not follow it;"
                " give the partner the same rules and remove them here first"
            )
        return self.partner, partner_name, info

    def _spec(self, info: Any) -> VolumeSpec:
        access = []
        if self.access is not None:
            access = [
                (r.client, r.mode)
                for r, stored in self.access.applying_to(info.name)
                if stored is not None and r.volume == info.name
            ]
        return VolumeSpec(
            size=info.size,
            pool=info.pool,
            cache_mode=str(info.cache_mode),
            alloc_warning=info.alloc_warning_spec,
            alloc_limit=info.alloc_limit_spec,
            access=access,
            snapshot_warning=info.snapshot_warning_spec,
            snapshot_limit=info.snapshot_limit_spec,
            snapshot_limit_policy=info.snapshot_limit_policy,
        )

    async def move(self, name: str, to: str) -> MoveResult:
        started = time.monotonic()
        partner, partner_name, info = await self._check(name, to)
        spec = self._spec(info)
        volume = self.engine.volume(name)
        move_id = secrets.token_hex(6)
        record = MoveRecord(move_id, name, f"move-{move_id}", MoveState.COPYING, partner=partner_name)
        self.busy.add(name)
        try:
            # Drain: no new host I/O (the gate), the sessions ended, every acknowledged write on the LDs.
            self.journal.put(record)
            self.crash("recorded")
            self.gate.hidden.add(name)
            try:
                await self._drain(name)
                extents = await allocated_extents(volume)
                copied = sum(n for _, n in extents)
                await partner.prepare(move_id, name, record.temp, spec, copied)
                self.crash("prepared")
                log.info(
                    "vv move: copying",
                    extra={"event": "vv-move-copying", "vv": name, "to": partner_name, "bytes": copied},
                )
                sums = []
                pieces = 0
                for offset, n in pieces_of(extents):
                    data = bytes(await volume.read(offset, n))
                    sums.append(crc32c(data))
                    await partner.write(move_id, offset, data)
                    pieces += 1
                    self.crash("copying")
                pieces_list = list(pieces_of(extents))
                theirs = await partner.checksums(move_id, pieces_list)
                bad = [p for p, a, b in zip(pieces_list, sums, theirs, strict=True) if a != b]
                if bad or len(theirs) != len(sums):
                    raise Conflict(
                        f"volume '{name}': {len(bad)} of {len(sums)} copied pieces read back different on"
                        f" {partner_name} (first at offset {bad[0][0] if bad else '?'}): the move is rolled back"
                    )
                self.crash("verified")
                # The volume must still be what was copied (an admin could have changed it meanwhile).
                now = self.engine.get_vv(name)
                if self.engine.volume(name) is not volume or now.size != info.size or now.children:
                    raise Conflict(
                        f"volume '{name}' changed during its move (resized, renamed or snapshotted)"
                    )
            except BaseException as exc:
                await self._roll_back(record, reason=exc)
                raise
            record.state = MoveState.SWITCHING
            record.spec = asdict(spec)
            self.journal.put(record)  # from here on, only forward
            self.crash("switching")
            try:
                await self._finish(record)
            except PartnerUnavailable as exc:
                self._background(self._finish_until_done(record))
                raise PartnerUnavailable(
                    f"volume '{name}' was copied and verified on {partner_name}, which stopped answering"
                    f" at the switch ({exc}): the move finishes when it answers; until then no node serves it"
                ) from None
        finally:
            self.busy.discard(name)
        result = MoveResult(
            name,
            self.node_name,
            partner_name,
            info.size,
            copied,
            pieces,
            round(time.monotonic() - started, 3),
        )
        log.info(
            "vv moved to the partner",
            extra={
                "event": "vv-moved",
                "vv": name,
                "to": partner_name,
                "bytes": copied,
                "seconds": result.seconds,
            },
        )
        return result

    async def _drain(self, name: str) -> None:
        for session in list(self.engine.sessions.of(name)):
            log.info(
                "vv move: disconnecting a client",
                extra={"event": "vv-move-disconnect", "vv": name, "peer": session.peer},
            )
            session.disconnect()
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.engine.sessions.of(name):
            if time.monotonic() > deadline:
                raise Conflict(
                    f"volume '{name}': its clients did not disconnect within {DRAIN_TIMEOUT:.0f} s"
                )
            await asyncio.sleep(0.02)
        await self.engine.flush_all()

    async def _roll_back(self, record: MoveRecord, *, reason: BaseException | None) -> None:
        """Before SWITCHING: this node serves the volume again at once; the partial copy on the
        partner is deleted (now, or in the background while the partner cannot be reached)."""
        if not isinstance(reason, Exception):
            return  # cancelled (the daemon stops) or a crash played by a test: recover() rolls back
        self.gate.hidden.discard(record.vv)
        log.warning(
            "vv move rolled back: %s",
            reason,
            extra={"event": "vv-move-rolled-back", "vv": record.vv, "move": record.id},
        )
        if not await self._try_abort(record):
            self._background(self._abort_until_done(record))

    async def _try_abort(self, record: MoveRecord) -> bool:
        assert self.partner is not None
        try:
            await self.partner.abort(record.id)
        except PartnerUnavailable:
            return False
        self.journal.drop(record.id)
        return True

    async def _abort_until_done(self, record: MoveRecord) -> None:
        while not await self._try_abort(record):
            await asyncio.sleep(RETRY_INTERVAL)

    async def _finish(self, record: MoveRecord) -> None:
        """SWITCHING: the target takes the name, then this node drops its copy.  A refusal of the
        target (its temporary volume gone, the name taken there meanwhile) means it does not serve
        this copy: the move is rolled back (this node serves it again)."""
        assert self.partner is not None and record.spec is not None
        spec = VolumeSpec(**{**record.spec, "access": [(a[0], a[1]) for a in record.spec["access"]]})
        try:
            await self.partner.finish(record.id, spec)
        except PartnerUnavailable:
            raise
        except ThinblockError as exc:
            await self._roll_back(record, reason=exc)
            raise
        self.crash("renamed")
        with contextlib.suppress(NotFound):
            await self.engine.delete_vv(record.vv, force=True)
        if self.access is not None:
            self.access.forget_volume(record.vv)
        self.crash("deleted")
        self.journal.drop(record.id)
        self.gate.hidden.discard(record.vv)

    async def _finish_until_done(self, record: MoveRecord) -> None:
        while True:
            try:
                await self._finish(record)
                log.info(
                    "vv move finished after a restart", extra={"event": "vv-move-finished", "vv": record.vv}
                )
                return
            except PartnerUnavailable as exc:
                log.warning(
                    "vv move: waiting for the partner to finish it: %s",
                    exc,
                    extra={"event": "vv-move-waiting", "vv": record.vv, "move": record.id},
                )
            except ThinblockError:
                return  # rolled back (_finish said why)
            await asyncio.sleep(RETRY_INTERVAL)

    def recover(self) -> None:
        """At start, before the host front ends: gate every volume whose move reached SWITCHING
        (it is served by the partner, or will be once it answers) and finish those moves in the
        background; roll back every move that did not (this node serves the volume)."""
        for record in list(self.journal.records.values()):
            if record.state == MoveState.SWITCHING:
                self.gate.hidden.add(record.vv)
                log.info(
                    "vv move: finishing",
                    extra={"event": "vv-move-resume", "vv": record.vv, "move": record.id},
                )
                self._background(self._finish_until_done(record))
            else:
                log.info(
                    "vv move: rolled back after a restart",
                    extra={"event": "vv-move-rolled-back", "vv": record.vv, "move": record.id},
                )
                self._background(self._abort_until_done(record))

    def _background(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Wait for the background work (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


# --- the target ------------------------------------------------------------------------------


class IncomingMoves:
    """The target side: the volumes being moved here, under their temporary names (hidden from
    hosts by the gate until they are renamed)."""

    def __init__(self, engine: Engine, journal: MoveJournal, gate: VolumeGate, *, access: Any = None) -> None:
        self.engine = engine
        self.journal = journal
        self.gate = gate
        self.access = access
        for record in journal.records.values():
            if record.state == MoveState.INCOMING:
                gate.hidden.add(record.temp)

    def _record(self, move_id: str) -> MoveRecord:
        record = self.journal.records.get(move_id)
        if record is None:
            raise NotFound(f"no move {move_id} on this node")
        return record

    def state(self, move_id: str) -> MoveRecord:
        return self._record(move_id)

    async def prepare(self, move_id: str, vv: str, temp: str, spec: VolumeSpec, needed: int) -> MoveRecord:
        if move_id in self.journal.records:
            raise AlreadyExists(f"move {move_id} exists already")
        try:
            self.engine.get_vv(vv)
        except NotFound:
            pass
        else:
            raise AlreadyExists(f"volume '{vv}' already exists on this node: rename or delete it first")
        try:
            pool = self.engine.get_pool(spec.pool)
        except NotFound:
            raise NotFound(
                f"this node has no pool '{spec.pool}' for volume '{vv}': create it first"
            ) from None
        # Regions of this pool's size that the copied bytes can touch, at most: one more per extent.
        room = pool_room(self.engine, spec.pool)
        if needed + pool.region_size > room and needed > 0:
            raise OutOfSpace(
                f"pool '{spec.pool}' has room for {format_size(room)}, volume '{vv}' needs"
                f" {format_size(needed)}: add PDs or raise its growth limit first",
                "pool-growth-limit",
            )
        record = MoveRecord(move_id, vv, temp, MoveState.INCOMING)
        self.journal.put(record)
        self.gate.hidden.add(temp)
        # Written through while it fills: every copied piece is on the LDs when its write returns.
        info = await self.engine.create_vv(
            temp, pool=spec.pool, size=spec.size, cache_mode=CacheMode.WRITETHROUGH
        )
        record.created = info.created
        self.journal.put(record)
        return record

    def _incoming(self, move_id: str) -> tuple[MoveRecord, Any]:
        record = self._record(move_id)
        if record.state != MoveState.INCOMING:
            raise Conflict(f"move {move_id} is {record.state}")
        return record, self.engine.volume(record.temp)

    async def write(self, move_id: str, offset: int, data: bytes) -> None:
        record, volume = self._incoming(move_id)
        if offset < 0 or offset + len(data) > volume.size or offset % 512 or len(data) % 512:
            raise InvalidArgument(f"a piece at {offset} (+{len(data)}) is outside volume '{record.temp}'")
        await volume.write(offset, data)

    async def checksums(self, move_id: str, pieces: list[tuple[int, int]]) -> list[int]:
        record, volume = self._incoming(move_id)
        await volume.flush()
        out = []
        for offset, n in pieces:
            if offset < 0 or n <= 0 or offset + n > volume.size:
                raise InvalidArgument(f"a piece at {offset} (+{n}) is outside volume '{record.temp}'")
            out.append(crc32c(await volume.read(offset, n)))
        return out

    async def finish(self, move_id: str, spec: VolumeSpec) -> MoveRecord:
        """Give TEMP the volume's settings and its name (idempotent: a repeat after a crash of
        either node answers the finished record)."""
        record = self._record(move_id)
        if record.state == MoveState.FINISHED:
            return record
        try:
            self.engine.get_vv(record.temp)
        except NotFound:
            # Renamed before a crash of this node, the record not yet updated: the volume that has
            # the name now is TEMP if it was created at TEMP's creation time.
            try:
                renamed = self.engine.get_vv(record.vv)
            except NotFound:
                renamed = None
            if renamed is None or renamed.created != record.created:
                raise Conflict(f"move {move_id}: volume '{record.temp}' is gone") from None
        else:
            try:
                self.engine.get_vv(record.vv)
            except NotFound:
                pass
            else:  # created here meanwhile: its access rules must not change
                raise AlreadyExists(
                    f"volume '{record.vv}' already exists on this node (made during the move)"
                )
            if spec.cache_mode:
                await self.engine.set_vv(
                    record.temp,
                    cache_mode=spec.cache_mode,
                    alloc_warning=_limit(spec.alloc_warning),
                    alloc_limit=_limit(spec.alloc_limit),
                    snapshot_warning=_limit(spec.snapshot_warning),
                    snapshot_limit=_limit(spec.snapshot_limit),
                    snapshot_limit_policy=spec.snapshot_limit_policy,
                )
            if self.access is not None:
                for client, mode in spec.access:
                    self.access.put(record.vv, client, mode)  # before the name serves: never unrestricted
            await self.engine.flush_all()
            await self.engine.rename_vv(record.temp, record.vv)  # AlreadyExists: the source rolls back
        record.state = MoveState.FINISHED
        self.journal.put(record)
        self.gate.hidden.discard(record.temp)
        return record

    async def abort(self, move_id: str) -> None:
        """Delete TEMP (a move that did not reach its switch); a move unknown here is done."""
        record = self.journal.records.get(move_id)
        if record is None:
            return
        if record.state == MoveState.FINISHED:
            raise Conflict(f"move {move_id} finished: volume '{record.vv}' is served here")
        with contextlib.suppress(NotFound):
            info = self.engine.get_vv(record.temp)
            if record.created is None or info.created == record.created:
                await self.engine.delete_vv(record.temp, force=True)
        self.journal.drop(move_id)
        self.gate.hidden.discard(record.temp)


def _limit(spec: str | None) -> Limit | None:
    return None if spec is None else Limit.parse(spec)


__all__ = [
    "IncomingMoves",
    "MoveJournal",
    "MoveRecord",
    "MoveResult",
    "MoveState",
    "Mover",
    "Partner",
    "PartnerUnavailable",
    "VolumeGate",
    "VolumeSpec",
]
