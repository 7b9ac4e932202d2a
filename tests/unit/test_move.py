"""The planned move of a volume to the partner (node/move.py), on two real engines in one process,
the partner reached without sockets (LocalPartner).

The state machine: a kill -9 of the source at every step is played by raising ``Crash`` there
(nothing after it runs, the journal and both stores stay as they are), then the source is
"restarted": its engine closed and opened again from its data directory, a new gate, journal and
mover, ``recover()``.  Checked after every restart, before and after the background work: never
two nodes serving the name, and once settled exactly one, with every byte written before the move.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.engine_helpers import CHUNKLET, REGION, STEP, make_engine, pattern, reopen
from thinblock.engine import Engine
from thinblock.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, OutOfSpace
from thinblock.model import CacheMode
from thinblock.nbd.access import AccessStore
from thinblock.node.move import (
    INCOMING_FILE,
    OUTGOING_FILE,
    IncomingMoves,
    MoveJournal,
    Mover,
    MoveState,
    PartnerUnavailable,
    VolumeGate,
    VolumeSpec,
    allocated_extents,
    crc32c,
    decode_piece,
    encode_piece,
)
from thinblock.units import KiB, Limit, MiB


class Crash(BaseException):
    """A kill -9 played in process: raised by the crash hook at a named step, it leaves
    everything as it is (a BaseException: the mover does not roll back for it, as a dead
    process would not); the next ``recover`` settles it."""


class LocalPartner:
    """The target reached without sockets: an IncomingMoves in this process (``down``: the
    partner's API does not answer)."""

    def __init__(self, node_name: str, incoming: Callable[[], IncomingMoves]) -> None:
        self.node_name = node_name
        self.incoming = incoming  # called each time: a "restarted" target is a new IncomingMoves
        self.down = False

    def _target(self) -> IncomingMoves:
        if self.down:
            raise PartnerUnavailable("connection refused")
        return self.incoming()

    async def name(self) -> str:
        self._target()
        return self.node_name

    async def prepare(self, move_id: str, vv: str, temp: str, spec: VolumeSpec, needed: int) -> None:
        await self._target().prepare(move_id, vv, temp, spec, needed)

    async def write(self, move_id: str, offset: int, data: bytes) -> None:
        await self._target().write(move_id, offset, data)

    async def checksums(self, move_id: str, pieces: list[tuple[int, int]]) -> list[int]:
        return await self._target().checksums(move_id, pieces)

    async def finish(self, move_id: str, spec: VolumeSpec) -> None:
        await self._target().finish(move_id, spec)

    async def abort(self, move_id: str) -> None:
        await self._target().abort(move_id)


SIZE = 4 * MiB
# Written before the move: three runs, the middle one across a region boundary; the rest unwritten.
WRITES = [(0, 8 * KiB), (REGION * 5 - 4 * KiB, 12 * KiB), (SIZE - REGION, REGION)]
STEPS_BACK = ["recorded", "prepared", "copying", "verified"]  # a crash here: rolled back
STEPS_FORWARD = ["switching", "renamed", "deleted"]  # a crash here: finished


@dataclass
class Side:
    engine: Engine
    gate: VolumeGate
    journal: MoveJournal
    access: AccessStore

    def serves(self, name: str) -> bool:
        return name in self.gate.export_names()


class Pair:
    """n1 (the source) and n2 (the target), each with its data directory and store."""

    def __init__(self, tmp_path: Path) -> None:
        self.dirs = (tmp_path / "n1", tmp_path / "n2")
        self.crash_at: str | None = None
        self.pending: Any = None

    async def start(self, *, pd_sizes: tuple[int, int] = (4 * MiB, 4 * MiB)) -> None:
        engines = []
        for d, pd_size in zip(self.dirs, pd_sizes, strict=True):
            d.mkdir()
            e = await make_engine(d, pd_size=pd_size)
            await e.create_pool("p", raid=1, region_size=REGION, growth_increment=CHUNKLET, step=STEP)
            engines.append(e)
        self.source = self._side(engines[0], OUTGOING_FILE)
        self.target = self._side(engines[1], INCOMING_FILE)
        self.incoming = IncomingMoves(
            self.target.engine, self.target.journal, self.target.gate, access=self.target.access
        )
        self.partner = LocalPartner("n2", lambda: self.incoming)
        self.mover = self._mover()

    def _side(self, engine: Engine, journal: str) -> Side:
        d = engine.data_dir
        assert d is not None
        return Side(engine, VolumeGate(engine), MoveJournal(d / journal), AccessStore(d / "access.json"))

    def _mover(self) -> Mover:
        def crash(step: str) -> None:
            if step == self.crash_at:
                raise Crash(step)

        return Mover(
            self.source.engine,
            self.partner,
            self.source.journal,
            self.source.gate,
            node_name="n1",
            access=self.source.access,
            crash=crash,
        )

    async def restart_source(self) -> None:
        """kill -9 of the source and a new start: the engine from its data directory, the
        journal from its file, a gate with nothing hidden, then recover()."""
        self.crash_at = None
        engine = await reopen(self.source.engine)
        self.source = self._side(engine, OUTGOING_FILE)
        self.mover = self._mover()
        self.mover.recover()

    async def restart_target(self) -> None:
        engine = await reopen(self.target.engine)
        self.target = self._side(engine, INCOMING_FILE)
        self.incoming = IncomingMoves(
            engine, self.target.journal, self.target.gate, access=self.target.access
        )

    async def close(self) -> None:
        await self.mover.aclose()
        await self.source.engine.close()
        await self.target.engine.close()


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    p = Pair(tmp_path)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def write_volume(engine: Engine, name: str = "v", mode: CacheMode = CacheMode.WRITEBACK) -> bytes:
    """The volume with WRITES on it (write-back: some still dirty in the cache at the move);
    its whole expected content."""
    await engine.create_vv(name, pool="p", size=SIZE, cache_mode=mode)
    vv = engine.volume(name)
    expected = bytearray(SIZE)
    for i, (offset, n) in enumerate(WRITES):
        data = pattern(i + 1, n)
        await vv.write(offset, data)
        expected[offset : offset + n] = data
    return bytes(expected)


async def content(side: Side, name: str = "v") -> bytes:
    return bytes(await side.engine.volume(name).read(0, SIZE))


def volumes(side: Side) -> set[str]:
    return {v.name for v in side.engine.list_vvs()}


async def test_a_move_hands_the_volume_over_thin_and_with_its_settings(pair: Pair) -> None:
    expected = await write_volume(pair.source.engine)
    await pair.source.engine.set_vv("v", alloc_warning=Limit.parse("50%"), alloc_limit=Limit.parse("3MiB"))
    pair.source.access.put("v", "127.0.0.1", "ro")
    allocated = pair.source.engine.get_vv("v").allocated
    result = await pair.mover.move("v", "n2")
    assert (result.source, result.target, result.copied_bytes) == ("n1", "n2", allocated)
    assert "v" not in volumes(pair.source) and not pair.source.serves("v")
    assert volumes(pair.target) == {"v"} and pair.target.serves("v")
    info = pair.target.engine.get_vv("v")
    # thin: only the assigned regions were written on the target
    assert info.allocated == allocated < SIZE
    assert (info.cache_mode, info.alloc_warning_spec, info.alloc_limit_spec) == (
        CacheMode.WRITEBACK,
        "50%",
        "3 MiB",
    )
    assert [(r.client, r.mode) for r, s in pair.target.access.applying_to("v") if s] == [("127.0.0.1", "ro")]
    assert pair.source.access.applying_to("v") == []  # a new volume "v" here inherits no grant
    assert await content(pair.target) == expected
    assert pair.source.journal.records == {}
    assert [r.state for r in pair.target.journal.records.values()] == [MoveState.FINISHED]


async def test_the_copy_is_only_the_assigned_extents(pair: Pair) -> None:
    await write_volume(pair.source.engine)
    extents = await allocated_extents(pair.source.engine.volume("v"))
    # WRITES rounded out to regions: [0, R), [4R, 6R), [SIZE-R, SIZE)
    assert extents == [(0, REGION), (4 * REGION, 2 * REGION), (SIZE - REGION, REGION)]


@pytest.mark.parametrize("step", STEPS_BACK + STEPS_FORWARD)
async def test_a_crash_of_the_source_at_every_step_leaves_one_copy_serving(pair: Pair, step: str) -> None:
    expected = await write_volume(pair.source.engine)
    await pair.source.engine.set_vv(
        "v",
        alloc_limit=Limit.parse("75%"),
        snapshot_limit=Limit.parse("10%"),
        snapshot_limit_policy="invalidate-oldest",
    )
    pair.source.access.put("v", "10.0.0.0/8", "rw")
    pair.crash_at = step
    with pytest.raises(Crash):
        await pair.mover.move("v", "n2")
    await pair.restart_source()
    # at once (before the background work): never two
    assert not (pair.source.serves("v") and pair.target.serves("v"))
    await pair.mover.settle()
    assert pair.source.serves("v") != pair.target.serves("v"), "exactly one node serves the name"
    serving = pair.target if step in STEPS_FORWARD else pair.source
    other = pair.source if serving is pair.target else pair.target
    assert serving.serves("v") and await content(serving) == expected
    assert volumes(other) == set(), "no leftover copy (the temporary volume, or the source's)"
    assert pair.source.journal.records == {}
    # the settings are the volume's wherever it ended (a finish after a restart sends them again)
    info = serving.engine.get_vv("v")
    assert (info.cache_mode, info.alloc_limit_spec) == (CacheMode.WRITEBACK, "75%")
    assert (info.snapshot_limit_spec, info.snapshot_limit_policy) == ("10%", "invalidate-oldest")
    assert [(r.client, r.mode) for r, s in serving.access.applying_to("v") if s] == [("10.0.0.0/8", "rw")]


@pytest.mark.parametrize("step", STEPS_FORWARD)
async def test_a_crash_of_both_nodes_at_the_switch_finishes_once_the_partner_answers(
    pair: Pair, step: str
) -> None:
    expected = await write_volume(pair.source.engine)
    pair.crash_at = step
    with pytest.raises(Crash):
        await pair.mover.move("v", "n2")
    await pair.restart_target()
    pair.partner.down = True
    await pair.restart_source()
    # The source never serves again; with the partner down, until it answers, nobody does
    # (the verified copy waits there): the honest cost of "never two".
    assert not pair.source.serves("v")
    pair.partner.down = False
    await pair.mover.settle()
    assert pair.target.serves("v") and not pair.source.serves("v")
    assert await content(pair.target) == expected


async def test_a_target_that_renamed_then_crashed_before_its_journal_is_finished_not_redone(
    pair: Pair,
) -> None:
    expected = await write_volume(pair.source.engine)
    pair.crash_at = "switching"
    with pytest.raises(Crash):
        await pair.mover.move("v", "n2")
    (record,) = pair.target.journal.records.values()
    # the target's finish got as far as the rename; its journal still says INCOMING
    await pair.target.engine.rename_vv(record.temp, "v")
    await pair.restart_target()
    assert pair.target.journal.records[record.id].state == MoveState.INCOMING
    await pair.restart_source()
    await pair.mover.settle()
    assert pair.target.serves("v") and not pair.source.serves("v") and volumes(pair.source) == set()
    assert pair.target.journal.records[record.id].state == MoveState.FINISHED
    assert await content(pair.target) == expected


async def test_a_rolled_back_move_with_the_partner_down_cleans_up_when_it_returns(pair: Pair) -> None:
    await write_volume(pair.source.engine)
    pair.crash_at = "copying"
    with pytest.raises(Crash):
        await pair.mover.move("v", "n2")
    pair.partner.down = True
    await pair.restart_source()
    assert pair.source.serves("v")  # at once: the rollback needs nothing of the partner
    assert len(pair.target.journal.records) == 1  # the partial copy is still there, hidden
    assert not pair.target.serves(next(iter(pair.target.journal.records.values())).temp)
    pair.partner.down = False
    await pair.mover.settle()
    assert volumes(pair.target) == set() and pair.target.journal.records == {}


async def test_a_copy_that_reads_back_different_is_rolled_back(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = await write_volume(pair.source.engine)
    real_write = pair.incoming.write

    async def damaging_write(move_id: str, offset: int, data: bytes) -> None:
        await real_write(move_id, offset, data[:-1] + bytes([data[-1] ^ 1]) if offset == 0 else data)

    monkeypatch.setattr(pair.incoming, "write", damaging_write)
    with pytest.raises(Conflict, match="read back different"):
        await pair.mover.move("v", "n2")
    await pair.mover.settle()
    assert pair.source.serves("v") and await content(pair.source) == expected
    assert volumes(pair.target) == set()


async def test_the_moving_volume_is_hidden_from_hosts_and_its_sessions_ended(pair: Pair) -> None:
    await write_volume(pair.source.engine)
    sessions = pair.source.engine.sessions
    disconnected: list[str] = []

    def disconnect() -> None:  # as a front end's: the connection ends, its session closes
        disconnected.append("v")
        sessions.close(session)

    session = sessions.open("NBD", "v", "127.0.0.1:1", disconnect)
    seen: list[bool] = []
    real_prepare = pair.incoming.prepare

    async def prepare(*args: object, **kwargs: object) -> object:
        seen.append(pair.source.serves("v"))
        with pytest.raises(NotFound, match="being moved"):
            pair.source.gate.open_volume("v")
        return await real_prepare(*args, **kwargs)  # type: ignore[arg-type]

    pair.incoming.prepare = prepare  # type: ignore[method-assign]
    await pair.mover.move("v", "n2")
    assert seen == [False] and disconnected == ["v"] and sessions.of("v") == []


async def test_refusals_say_why_and_change_nothing(pair: Pair, tmp_path: Path) -> None:
    await write_volume(pair.source.engine)
    with pytest.raises(InvalidArgument, match="not this pair's"):
        await pair.mover.move("v", "n3")
    with pytest.raises(InvalidArgument, match="already on node n1"):
        await pair.mover.move("v", "n1")
    with pytest.raises(NotFound):
        await pair.mover.move("nope", "n2")
    await pair.source.engine.snapshot_vv("v", "v-snap")
    with pytest.raises(Conflict, match="snapshots or clones"):
        await pair.mover.move("v", "n2")
    await pair.source.engine.delete_vv("v-snap")
    await pair.target.engine.create_vv("v", pool="p", size=MiB)
    with pytest.raises(AlreadyExists, match="already exists on this node"):
        await pair.mover.move("v", "n2")
    await pair.target.engine.delete_vv("v")
    pair.partner.down = True
    with pytest.raises(PartnerUnavailable, match="the partner is down"):
        await pair.mover.move("v", "n2")
    pair.partner.down = False
    alone = Mover(pair.source.engine, None, pair.source.journal, pair.source.gate, node_name="n1")
    with pytest.raises(Conflict, match="no partner"):
        await alone.move("v", "n2")
    # nothing changed: the source serves, nothing on the target, no journal
    assert pair.source.serves("v") and volumes(pair.target) == set()
    assert pair.source.journal.records == {} and pair.target.journal.records == {}


async def test_a_target_without_space_is_refused_before_copying(tmp_path: Path) -> None:
    p = Pair(tmp_path)
    await p.start(pd_sizes=(4 * MiB, MiB))  # n2: 4 PDs of 1 MiB, RAID 1: under 2 MiB of room
    try:
        await p.source.engine.create_vv("v", pool="p", size=SIZE, cache_mode=CacheMode.WRITETHROUGH)
        await p.source.engine.volume("v").write(0, pattern(1, 3 * MiB))
        with pytest.raises(OutOfSpace, match="has room for"):
            await p.mover.move("v", "n2")
        assert p.source.serves("v") and volumes(p.target) == set()
        await p.mover.settle()
        assert p.target.journal.records == {}
    finally:
        await p.close()


async def test_a_partner_lost_at_the_switch_finishes_the_move_when_it_answers(pair: Pair) -> None:
    expected = await write_volume(pair.source.engine)

    def partner_lost(step: str) -> None:
        if step == "switching":
            pair.partner.down = True

    pair.mover.crash = partner_lost
    with pytest.raises(PartnerUnavailable, match="finishes when it answers"):
        await pair.mover.move("v", "n2")
    assert not pair.source.serves("v") and not pair.target.serves("v")  # never two: here, none
    pair.partner.down = False
    await pair.mover.settle()
    assert pair.target.serves("v") and volumes(pair.source) == set()
    assert await content(pair.target) == expected


async def test_the_name_taken_on_the_target_at_the_switch_rolls_the_move_back(pair: Pair) -> None:
    expected = await write_volume(pair.source.engine)
    pair.source.access.put("v", "127.0.0.1", "rw")

    async def someone_creates_it(step: str) -> None:
        await pair.target.engine.create_vv("v", pool="p", size=MiB)

    def hook(step: str) -> None:
        if step == "switching":
            pair.pending = someone_creates_it(step)

    pair.pending = None
    real_finish = pair.incoming.finish

    async def finish(*args: object) -> object:
        if pair.pending is not None:
            await pair.pending
            pair.pending = None
        return await real_finish(*args)  # type: ignore[arg-type]

    pair.incoming.finish = finish  # type: ignore[method-assign]
    pair.mover.crash = hook
    with pytest.raises(AlreadyExists, match="made during the move"):
        await pair.mover.move("v", "n2")
    await pair.mover.settle()
    assert pair.source.serves("v") and await content(pair.source) == expected
    assert volumes(pair.target) == {"v"} and pair.target.engine.get_vv("v").size == MiB  # theirs, untouched
    assert [s for _, s in pair.target.access.applying_to("v") if s] == []  # no rule given to it
    assert pair.source.journal.records == {}


async def test_the_target_refuses_damaged_or_misplaced_pieces(pair: Pair) -> None:
    await write_volume(pair.source.engine)
    spec = VolumeSpec(SIZE, "p", "writeback", None, None, [])
    record = await pair.incoming.prepare("0123456789ab", "v", "move-0123456789ab", spec, REGION)
    assert not pair.target.serves(record.temp)  # hidden from hosts while it fills
    data = pattern(9, 4096)
    with pytest.raises(InvalidArgument, match="damaged in transit"):
        decode_piece(encode_piece(data), crc32c(data) ^ 1)
    with pytest.raises(InvalidArgument, match="not base64"):
        decode_piece("!!!", 0)
    assert decode_piece(encode_piece(data), crc32c(data)) == data
    for offset, piece in ((SIZE - 2048, data), (100, data), (0, data[:100])):
        with pytest.raises(InvalidArgument, match="outside volume"):
            await pair.incoming.write(record.id, offset, piece)
    with pytest.raises(NotFound, match="no move"):
        await pair.incoming.write("ffffffffffff", 0, data)
    with pytest.raises(AlreadyExists):
        await pair.incoming.prepare(record.id, "w", "move-x", spec, 0)
    await pair.incoming.abort(record.id)
    assert volumes(pair.target) == set() and pair.target.journal.records == {}
    await pair.incoming.abort(record.id)  # again: a move unknown here is done
