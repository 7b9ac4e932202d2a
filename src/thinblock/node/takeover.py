"""Takeover: the partner replays what it holds of a dead owner and serves its volumes (claim 3).

On one machine both nodes see each other's data directory (PDs and store), as a dual-
controller array's two nodes see the same drives.  Who owns a data directory is decided

* on PostgreSQL, by the owner's lease ``node:NAME`` in its store (metadata/lease.py): renewed
  by the owner every third of its time to live; the owner writes its PDs and its store only
  until its last grant's send time + ttl - margin (fence.py), so it has stopped before the lease
  can expire in the store;
* on SQLite, by the kernel: the engine's exclusive ``flock`` on ``DATA_DIR/thinblock.lock``,
  released the moment the owner process dies (``kill -9`` included) and never while it lives.

So:

1. the owner goes silent: its mirror link closes (EOF, a reset), or stays open with nothing on
   it for longer than the partner timeout (SIGSTOP, a cut link): the partner tries again every
   ``takeover_poll`` for as long as the owner stays silent;
2. the partner takes ownership: on PostgreSQL by compare-and-set of the owner's lease
   (``acquire_lease`` as a holder of its own: granted only once it expired, with epoch + 1),
   after which it refuses the old owner's mirror links (a fenced owner gets no write
   acknowledged on copies nobody will replay); on SQLite by opening the owner's engine, refused
   while the owner's lock is held;
3. the store's ``mirror_valid`` mark says whether the partner's copies are the owner's latest
   acknowledged writes: the owner sets it to the session's epoch before acknowledging on two
   copies and clears it before writing anything through (the partner lost), so copies made
   obsolete by later written-through writes are never replayed over them;
4. valid copies are written to the volumes, per volume in sequence order (by virtual
   address, through the volume's own write path: a region whose assignment the owner never
   committed is assigned again), then flushed; every one of these writes checks the new
   owner's own fence;
5. the taken-over volumes are written through (no partner is left to mirror to) and served
   on the owner's service address, so reconnecting clients find them where they were (bound
   once the old owner let it go: a stopped owner still holds it until it runs again, finds its
   lease lost and stops its NBD server).

An owner that died with valid copies at its partner (the mark set) and is restarted refuses to
start and gives its lease up (daemon.py): the partner takes over and replays them first.

The old owner started again while the partner's takeover holds its lease rejoins as partner
(daemon.py, ``_rejoin_while_taken_over``): it owns nothing, holds the partner's copies, and opens
its engine once its lease is free again.  Meanwhile the taken-over volumes are mirrored to it
(``TakenOver.mirror``: a ``NodePair`` with the owner's side only, under the old owner's name and
with its store's epoch marks, so the rejoined node holds them as ``own_holding``): brought in
sync first as any mirror is (RESYNC, flush, then two copies), written back again once in sync,
written through before.  When the old owner's lease is free again (the new owner died, or
handed the volumes back) it ends those links (``NodePair.freeze_own``) and replays what it
holds under the same valid mark as any takeover (``replay``) before serving.

Failback (``TakenOver.hand_back``, ``thinblock node failback``): only while that mirror is in
sync (the old owner runs and holds every acknowledged write); stop serving (the NBD clients
finish their requests and are disconnected), flush on the mirror, stop mirroring (the mark
obsolete: the LDs hold everything), close the engine (which releases the lease); the old owner
sees its lease free and serves its volumes on its own service address.  Both nodes see the same
PDs and store, so nothing is copied.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import Conflict
from .mirror_protocol import MirrorHolding

log = logging.getLogger("thinblock.node.takeover")

MIRROR_EPOCH_KEY = "mirror_epoch"  # the last epoch this node's mirror used (grows across restarts)
MIRROR_VALID_KEY = "mirror_valid"  # the epoch whose copies at the partner are current, or "0"


class MetaStore(Protocol):
    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...


class TakenOverVolume(Protocol):
    @property
    def region_size(self) -> int: ...

    async def write(self, offset: int, data: bytes, fua: bool = False) -> None: ...


class TakenOverEngine(Protocol):
    """What a takeover needs of the owner's engine (``engine.Engine`` provides it)."""

    store: Any
    vvs: dict[str, Any]

    async def flush_all(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ReplayResult:
    replayed: int
    replayed_bytes: int
    discarded: int  # copies not replayed: obsolete (the owner degraded after them) or of a deleted VV
    reason: str


async def replay(engine: TakenOverEngine, holding: MirrorHolding) -> ReplayResult:
    """Step 3 and 4 of the module docstring; the holding is empty afterwards."""
    valid = engine.store.get_meta(MIRROR_VALID_KEY)
    total = len(holding)
    if total == 0:
        if valid not in (None, "0"):
            # Consumed all the same: the new owner writes through from here, and the old owner,
            # started again later, must not take the mark for copies it died with.
            engine.store.set_meta(MIRROR_VALID_KEY, "0")
        return ReplayResult(0, 0, 0, "nothing held")
    if valid != str(holding.epoch):
        holding.clear()
        return ReplayResult(
            0, 0, total, f"obsolete: the owner's store marks epoch {valid} valid, held {holding.epoch}"
        )
    by_id = {vv.row.id: vv for vv in engine.vvs.values()}
    replayed = replayed_bytes = discarded = 0
    for write in holding.in_replay_order():
        vv = by_id.get(write.vv)
        if vv is None:
            discarded += 1  # deleted: a delete releases every region first, so this is not expected
            log.error("takeover: a held write of vv id %d, which no longer exists", write.vv)
            continue
        await vv.write(write.vv_region * vv.region_size + write.offset, write.data)
        replayed += 1
        replayed_bytes += len(write.data)
    await engine.flush_all()
    holding.clear()
    engine.store.set_meta(MIRROR_VALID_KEY, "0")
    return ReplayResult(replayed, replayed_bytes, discarded, "replayed")


class FailbackRefused(Conflict):
    """The old owner cannot take its volumes back now (it is not running, or not in sync)."""


@dataclass(slots=True)
class TakenOver:
    """A partner's volumes this node serves after a takeover: the partner's engine, the NBD
    server on the partner's service address, and the mirror to the partner once it rejoins."""

    owner: str
    engine: Any  # engine.Engine over the partner's data directory and store
    server: Any  # nbd.server.NBDServer on the partner's service address
    mirror: Any  # node.pair.NodePair, the owner's side only; None on SQLite (no rejoin there)
    leaving: bool = False  # a failback of these volumes is under way

    def mirror_state(self) -> str:
        return str(self.mirror.status().mirror) if self.mirror is not None else "degraded"

    async def hand_back(self) -> list[str]:
        """Failback (module docstring); the names of the volumes handed back."""
        if self.leaving:
            raise FailbackRefused(f"node {self.owner}'s volumes are being handed back already")
        state = self.mirror_state()
        if state != "in-sync":
            raise FailbackRefused(
                f"node {self.owner} is not in sync with its volumes here (mirror {state}): start it"
                " (it rejoins as partner and is brought in sync) before handing them back"
            )
        self.leaving = True
        names = list(self.engine.export_names())
        await self.server.stop()  # requests in flight finish; every client is disconnected
        await self.engine.flush_all()  # still mirrored: a failure here leaves the copies valid
        await self.mirror.stop()  # mark obsolete: the LDs hold every acknowledged write
        self.mirror.clear_degraded_alert()
        await self.engine.close()  # destages the rest and releases the lease node:OWNER
        return names

    async def close(self) -> None:
        await self.server.stop()
        if self.mirror is not None:
            await self.mirror.stop()
        await self.engine.close()


class Partnership(Protocol):
    def handed_back(self, owner: str) -> None: ...


async def fail_back(taken_over: list[TakenOver], pair: Partnership) -> list[str]:
    """``thinblock node failback``: hand every owner's volumes taken over back (``hand_back``),
    and tell this node's pair (``NodePair.handed_back``); the names of the volumes handed back."""
    if not taken_over:
        raise FailbackRefused("this node serves no volumes taken over from its partner")
    handed: list[str] = []
    for taken in list(taken_over):
        names = await taken.hand_back()
        taken_over.remove(taken)
        pair.handed_back(taken.owner)
        handed += names
        log.warning(
            "handed the partner's volumes back",
            extra={"event": "failback-done", "owner": taken.owner, "volumes": ",".join(names)},
        )
    return handed


class EpochMarks:
    """The owner's side of rule 3: the epoch of each mirror session, and the valid mark."""

    def __init__(self, store: MetaStore) -> None:
        self.store = store

    def next_epoch(self) -> int:
        epoch = int(self.store.get_meta(MIRROR_EPOCH_KEY) or 0) + 1
        self.store.set_meta(MIRROR_EPOCH_KEY, str(epoch))
        return epoch

    def mark_valid(self, epoch: int) -> None:
        self.store.set_meta(MIRROR_VALID_KEY, str(epoch))

    def mark_obsolete(self) -> None:
        self.store.set_meta(MIRROR_VALID_KEY, "0")

    def was_valid_at_death(self) -> int:
        """The epoch marked valid by an earlier process (0: none): it died mirrored."""
        return int(self.store.get_meta(MIRROR_VALID_KEY) or 0)


def elapsed_since(start: float) -> float:
    return round(time.monotonic() - start, 3)
