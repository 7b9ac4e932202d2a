"""The mirror link between the two nodes of a pair, as a sans-IO core (bytes in, events out).

Claim 3: the write of a write-back volume is replicated to another node before the host is
told it completed.  The owner of a volume sends every cached write to its partner; the
partner keeps it in memory until the owner says the region was destaged (its data on the
LD, durably, with its assignment committed), and acknowledges by sequence number.  If the
owner dies, the partner writes what it holds to the LDs, in sequence order, and serves the
volumes itself (takeover).  No sockets here: ``node/link.py`` moves the bytes.

Two cores, one per end of a link (one link per direction: the node owning volumes connects
to its partner's mirror listener)::

    owner                                             partner (holds the mirror)
    OwnerConnection                                   PartnerConnection + MirrorHolding
      HELLO(version, epoch, incarnation, node)  --->
                                                <---  HELLO(version, epoch, incarnation, node)
      RESYNC(epoch)                             --->  drop all held for this owner
      MIRROR(epoch, vv, seq, key, vv_region,
             offset, crc32c, data)              --->  hold it
                                                <---  ACK(vv, seq)
      DESTAGED(vv, seq, key, upto)              --->  drop key's entries with seq <= upto
                                                <---  ACK(vv, seq)
      RELEASE(vv, seq, key)                     --->  drop every entry of key
                                                <---  ACK(vv, seq)
      PING(token)                               --->
                                                <---  PONG(token)   (everything before it is done)
      ERROR(text) either way, then the sender closes.

An ACK is cumulative per volume: ACK(vv, seq) says that every message of ``vv`` up to ``seq``
(MIRROR, DESTAGED or RELEASE) was processed.  The partner answers what one read of the
stream brought with one ACK per volume (the last sequence it processed), sent before any
PONG or ERROR that follows those messages: a batch of writes arriving together costs one
small frame back, not one each.  ``seq`` must be one the owner sent and is waiting for.

Every frame: a 12-byte header ``magic u32 ("TBMR"), type u16, flags u16, body length u32``
then the body, all big-endian.  Flags are 0 but on a partner's HELLO, where ``TAKES_OVER``
(0x1) says that the partner replays the copies it holds when the owner dies (it is configured
to take the owner over): only then may the copies stand in for the disk at a FLUSH.  ``seq`` is per volume and strictly increasing (MIRROR, DESTAGED
and RELEASE share the counter; each is acknowledged); ``key`` is the packed LD region (``ld_id << 32 | index``), the
name the cache, the pool and the map use for it; ``vv_region`` lets a taking-over partner
record the assignment if the owner died before committing it.

Ordering rule (the reason RELEASE exists and is acknowledged): an LD region given back to
the pool (trim, delete, zeroing in place) may be handed to another volume.  A mirrored
copy of the old data still held by the partner would then be written into it at a
takeover: one volume's data in another's region.  So the owner releases a region only
after the partner acknowledged a RELEASE of it (``OwnerConnection.release`` says whether
one is needed; ``region_settled`` says when the region may be reused).  A DESTAGED counts
only once acknowledged: until then the partner may still hold the region's old writes (the
frame may be in a socket buffer when the owner dies).  The link is one
ordered stream, so a RELEASE is processed after every MIRROR sent before it.

Validation at the edge (the partner's side; an owner is trusted no more than an NBD
client): magic, type, flags, lengths, the version, HELLO first, the epoch of every MIRROR
equal to the session's, sequence numbers increasing per volume, the CRC of the data, a
region held for one volume at a time, and a bound on the bytes held.  A violation queues an
ERROR for the peer and ends the connection with ``ProtocolError``.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import google_crc32c

MAGIC = 0x54424D52  # "TBMR"
# 2: CRC32C (hardware: a tenth of zlib's CRC32 on a 1 MiB write, on each node) and cumulative
# ACKs.  A node of version 1 is refused at HELLO ("version 1 is not supported").
VERSION = 2
_HEADER = struct.Struct(">IHHI")  # magic, type, flags, body length
_HELLO = struct.Struct(">HQQH")  # version, epoch, incarnation, node name length (name follows)
_MIRROR = struct.Struct(">QQQQQII")  # epoch, vv, seq, key, vv_region, offset, crc32c (data follows)
_MIRROR_FRAME = struct.Struct(">IHHIQQQQQII")  # the header and a MIRROR's fixed part, packed at once
_VV_SEQ = struct.Struct(">QQ")  # ACK
_ACK_FRAME = struct.Struct(">IHHIQQ")  # a whole ACK frame
_VV_SEQ_KEY = struct.Struct(">QQQ")  # RELEASE
_DESTAGED = struct.Struct(">QQQQ")  # vv, seq, key, up to seq
_U64 = struct.Struct(">Q")  # RESYNC epoch, PING and PONG token
HELLO_TAKES_OVER = 0x1  # HELLO flag: the sender replays what it holds if the owner dies
HEADER_SIZE = _HEADER.size

MAX_NAME = 255
MAX_ERROR_TEXT = 1024
DEFAULT_MAX_DATA = 64 * 1024 * 1024  # one write piece: at most one region, at most an NBD request
DEFAULT_MAX_HELD = 1024 * 1024 * 1024  # what a partner holds for one owner before it refuses more


class MessageType(enum.IntEnum):
    HELLO = 1
    MIRROR = 2
    ACK = 3
    DESTAGED = 4
    RELEASE = 5
    RESYNC = 6
    PING = 7
    PONG = 8
    ERROR = 9


_TYPES = {int(m): m for m in MessageType}  # a dict lookup: MessageType(kind) costs a call per frame


# Which messages each end may receive.
_TO_PARTNER = frozenset(
    {
        MessageType.HELLO,
        MessageType.MIRROR,
        MessageType.DESTAGED,
        MessageType.RELEASE,
        MessageType.RESYNC,
        MessageType.PING,
        MessageType.ERROR,
    }
)
_TO_OWNER = frozenset({MessageType.HELLO, MessageType.ACK, MessageType.PONG, MessageType.ERROR})


# --- events -------------------------------------------------------------------------------------
class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class Hello:
    version: int
    epoch: int
    incarnation: int  # random per process start: tells a restarted peer from a reconnected one
    node: str
    takes_over: bool = False  # HELLO_TAKES_OVER: a partner that replays the copies at a takeover


@dataclass(frozen=True, slots=True)
class Mirrored:
    """Partner: a write is now held (its ACK is queued)."""

    vv: int
    seq: int
    key: int
    length: int


@dataclass(frozen=True, slots=True)
class Acked:
    """Owner: the partner processed every message of ``vv`` up to ``seq``: it holds those
    MIRRORs, dropped what those DESTAGEDs and RELEASEs named (a cumulative acknowledgement)."""

    vv: int
    seq: int


@dataclass(frozen=True, slots=True)
class Destaged:
    """Partner: region ``key`` of ``vv`` is durable up to ``upto``; its entries up to it were
    dropped (the ACK of ``seq`` is queued)."""

    vv: int
    seq: int
    key: int
    upto: int


@dataclass(frozen=True, slots=True)
class Released:
    """Partner: every entry of region ``key`` was dropped (its ACK is queued)."""

    vv: int
    seq: int
    key: int


@dataclass(frozen=True, slots=True)
class Resynced:
    """Partner: the owner started over; everything held for it was dropped."""

    epoch: int


@dataclass(frozen=True, slots=True)
class Ping:
    token: int


@dataclass(frozen=True, slots=True)
class Pong:
    token: int


@dataclass(frozen=True, slots=True)
class RemoteError:
    """The peer reported an error and is closing."""

    text: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed the stream at a frame boundary."""


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The stream broke a rule; an ERROR for the peer is queued.  The connection is over."""

    reason: str


Event = (
    Hello
    | Mirrored
    | Acked
    | Destaged
    | Released
    | Resynced
    | Ping
    | Pong
    | RemoteError
    | ConnectionClosed
    | ProtocolError
)


class MirrorViolation(Exception):
    """Raised inside the cores when the peer broke a rule; becomes ``ProtocolError``."""


# --- framing ------------------------------------------------------------------------------------
def frame(kind: MessageType, body: bytes | bytearray | memoryview = b"", flags: int = 0) -> bytes:
    return _HEADER.pack(MAGIC, kind, flags, len(body)) + bytes(body)


def encode_hello(epoch: int, incarnation: int, node: str, *, takes_over: bool = False) -> bytes:
    name = node.encode()
    if not name or len(name) > MAX_NAME:
        raise ValueError(f"node name must be 1..{MAX_NAME} bytes of UTF-8, not {node!r}")
    body = _HELLO.pack(VERSION, epoch, incarnation, len(name)) + name
    return frame(MessageType.HELLO, body, HELLO_TAKES_OVER if takes_over else 0)


def encode_error(text: str) -> bytes:
    return frame(MessageType.ERROR, text.encode()[:MAX_ERROR_TEXT])


def data_crc(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli) of ``data``, as iSCSI's digests and the move's pieces."""
    return int(google_crc32c.value(data if type(data) is bytes else bytes(data)))


class _FrameReader:
    """Splits the byte stream into ``(type, body)`` frames, bounded by ``max_body``."""

    def __init__(self, allowed: frozenset[MessageType], max_body: int) -> None:
        self._allowed = allowed
        self._max_body = max_body
        # Only a partner announces TAKES_OVER: the owner's reader (which receives the partner's
        # HELLO) accepts the flag, the partner's does not.
        self._hello_flags_allowed = MessageType.MIRROR not in allowed
        self.hello_flags = 0
        self._buf = bytearray()
        self._pos = 0
        self.eof = False

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if data:
            if self.eof:
                raise RuntimeError("data after end of stream")
            self._buf += data
        else:
            self.eof = True

    def next_frame(self) -> tuple[MessageType, memoryview] | None:
        """The next whole frame, or None when more data is needed.  MirrorViolation on a bad one.
        A HELLO's flags are in ``hello_flags``."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER_SIZE:
            return None
        magic, kind, flags, length = _HEADER.unpack_from(buf, pos)
        if magic != MAGIC:
            raise MirrorViolation(f"bad frame magic {magic:#010x}")
        message = _TYPES.get(kind)
        if message is None:
            raise MirrorViolation(f"unknown message type {kind}")
        if message not in self._allowed:
            raise MirrorViolation(f"{message.name} is not valid in this direction")
        known = HELLO_TAKES_OVER if message is MessageType.HELLO and self._hello_flags_allowed else 0
        if flags & ~known:
            raise MirrorViolation(f"unknown flags {flags:#06x} on {message.name}")
        if length > self._max_body:
            raise MirrorViolation(f"{message.name} body of {length} bytes is over the limit {self._max_body}")
        end = pos + HEADER_SIZE + length
        if len(buf) < end:
            return None
        with memoryview(buf) as view:
            body = memoryview(bytes(view[pos + HEADER_SIZE : end]))  # one copy, then the buffer may move
        self._pos = end
        if message is MessageType.HELLO:
            self.hello_flags = flags
        if end > 65536 and end * 2 > len(buf):
            del buf[:end]  # compact: keep the buffer from growing with the stream
            self._pos = 0
        return message, body

    @property
    def leftover(self) -> int:
        """Bytes received that are not a whole frame (non-zero at end of stream: truncated)."""
        return len(self._buf) - self._pos


def _decode_hello(body: memoryview, flags: int = 0) -> Hello:
    if len(body) < _HELLO.size:
        raise MirrorViolation("HELLO too short")
    version, epoch, incarnation, name_length = _HELLO.unpack_from(body)
    if not 0 < name_length <= MAX_NAME or len(body) != _HELLO.size + name_length:
        raise MirrorViolation("HELLO node name length does not match its body")
    try:
        node = bytes(body[_HELLO.size :]).decode()
    except UnicodeDecodeError:
        raise MirrorViolation("HELLO node name is not UTF-8") from None
    if version != VERSION:
        raise MirrorViolation(
            f"mirror protocol version {version} is not supported (this node speaks {VERSION})"
        )
    return Hello(version, epoch, incarnation, node, takes_over=bool(flags & HELLO_TAKES_OVER))


def _fixed(body: memoryview, layout: struct.Struct, what: MessageType) -> tuple[int, ...]:
    if len(body) != layout.size:
        raise MirrorViolation(f"{what.name} body is {len(body)} bytes, not {layout.size}")
    return layout.unpack(body)


def _decode_error(body: memoryview) -> RemoteError:
    return RemoteError(bytes(body[:MAX_ERROR_TEXT]).decode(errors="replace"))


class _Core:
    """What both ends share: the frame reader, the outgoing buffer, the end of the connection."""

    def __init__(self, allowed: frozenset[MessageType], max_body: int) -> None:
        self._reader = _FrameReader(allowed, max_body)
        self._out = bytearray()
        self.closed = False  # an ERROR was sent or received, or the stream ended
        self.peer: Hello | None = None

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Bytes from the peer; ``b""`` means end of stream."""
        self._reader.feed(data)

    def data_to_send(self) -> bytes:
        self._queue_acks()
        out = bytes(self._out)
        self._out.clear()
        return out

    def _queue_acks(self) -> None:
        """Put acknowledgements kept back for a batch into the outgoing bytes (the partner's)."""

    @property
    def pending_bytes(self) -> int:
        """Bytes queued for the peer and not yet taken by ``data_to_send``."""
        return len(self._out)

    def next_event(self) -> Event | _NeedData:
        if self.closed:
            return NEED_DATA
        try:
            got = self._reader.next_frame()
            if got is None:
                if self._reader.eof:
                    self.closed = True
                    if self._reader.leftover:
                        return ProtocolError(f"stream ended inside a frame ({self._reader.leftover} bytes)")
                    return ConnectionClosed()
                return NEED_DATA
            kind, body = got
            if kind is MessageType.ERROR:
                self.closed = True
                return _decode_error(body)
            if kind is MessageType.HELLO:
                if self.peer is not None:
                    raise MirrorViolation("a second HELLO")
                self.peer = _decode_hello(body, self._reader.hello_flags)
                self._hello_received(self.peer)
                return self.peer
            if self.peer is None:
                raise MirrorViolation(f"{kind.name} before HELLO")
            return self._handle(kind, body)
        except MirrorViolation as exc:
            self.closed = True
            self._queue_acks()  # what was processed before the error is acknowledged before it
            self._out += encode_error(str(exc))
            return ProtocolError(str(exc))

    def _hello_received(self, hello: Hello) -> None:
        pass

    def _handle(self, kind: MessageType, body: memoryview) -> Event:
        raise NotImplementedError


# --- the partner's side -------------------------------------------------------------------------
@dataclass(slots=True)
class HeldWrite:
    vv: int
    seq: int
    key: int
    vv_region: int
    offset: int
    data: bytes


class MirrorHolding:
    """The writes a partner holds for one owner node, until destaged, released or replayed.

    Outlives connections: a link that drops and comes back keeps it (the owner resyncs it),
    and a takeover replays it (``in_replay_order``)."""

    def __init__(self, owner: str, *, max_bytes: int = DEFAULT_MAX_HELD) -> None:
        self.owner = owner
        self.max_bytes = max_bytes
        self.epoch = 0  # the epoch the held writes were sent under
        self.incarnation = 0  # the owner process that sent them (0: none yet)
        self.session: object | None = None  # the connection whose RESYNC started what is held
        self.held_bytes = 0
        self._by_vv: dict[int, dict[int, HeldWrite]] = {}  # vv -> seq -> write, in seq order
        self._by_key: dict[int, dict[int, HeldWrite]] = {}  # key -> seq -> write, in seq order
        self.last_seq: dict[int, int] = {}  # vv -> highest seq seen (MIRROR or RELEASE)

    def __len__(self) -> int:
        return sum(len(w) for w in self._by_vv.values())

    def regions(self) -> set[int]:
        return set(self._by_key)

    def held_for(self, key: int) -> list[HeldWrite]:
        return list(self._by_key.get(key, {}).values())

    def _next_seq(self, vv: int, seq: int, what: str) -> None:
        last = self.last_seq.get(vv, 0)
        if seq <= last:
            raise MirrorViolation(f"{what} vv={vv} seq={seq} is not after seq {last}")
        self.last_seq[vv] = seq

    def add(self, write: HeldWrite) -> None:
        entries = self._by_key.get(write.key)
        if entries:
            other = next(iter(entries.values())).vv
            if other != write.vv:
                raise MirrorViolation(
                    f"region {write.key:#x} mirrored for vv {write.vv} while held for vv {other}"
                )
        if self.held_bytes + len(write.data) > self.max_bytes:
            raise MirrorViolation(f"mirror full: {self.held_bytes} bytes held, limit {self.max_bytes}")
        self._next_seq(write.vv, write.seq, "MIRROR")
        self._by_vv.setdefault(write.vv, {})[write.seq] = write
        self._by_key.setdefault(write.key, {})[write.seq] = write
        self.held_bytes += len(write.data)

    def _drop(self, write: HeldWrite) -> None:
        del self._by_vv[write.vv][write.seq]
        if not self._by_vv[write.vv]:
            del self._by_vv[write.vv]
        self.held_bytes -= len(write.data)

    def drop_destaged(self, vv: int, key: int, seq: int, upto: int) -> None:
        if upto >= seq:
            raise MirrorViolation(f"DESTAGED vv={vv} seq={seq} up to {upto}: not a sequence sent before it")
        self._next_seq(vv, seq, "DESTAGED")
        seq = upto
        entries = self._by_key.get(key)
        if not entries:
            return
        for s in [s for s, w in entries.items() if s <= seq and w.vv == vv]:
            self._drop(entries.pop(s))
        if not entries:
            del self._by_key[key]

    def release(self, vv: int, key: int, seq: int) -> None:
        self._next_seq(vv, seq, "RELEASE")
        entries = self._by_key.pop(key, None)
        if entries:
            if next(iter(entries.values())).vv != vv:
                raise MirrorViolation(f"RELEASE of region {key:#x} for vv {vv}, held for another volume")
            for write in entries.values():
                self._drop(write)

    def clear(self) -> None:
        self._by_vv.clear()
        self._by_key.clear()
        self.held_bytes = 0
        self.last_seq.clear()

    def in_replay_order(self) -> Iterator[HeldWrite]:
        """Every held write, per volume in sequence order (the order the owner acknowledged them):
        what a taking-over partner writes to the LDs."""
        for vv in sorted(self._by_vv):
            yield from sorted(self._by_vv[vv].values(), key=lambda w: w.seq)


class PartnerConnection(_Core):
    """The partner's end of one link: validates, holds what the owner mirrors, acknowledges.

    ``accept_owner(hello)`` is the policy (the pair's): None to accept the owner's HELLO, or the
    reason to refuse it (an unknown node, an epoch older than one already seen: a fenced owner).
    The holding is the application's and outlives the connection."""

    def __init__(
        self,
        node: str,
        epoch: int,
        incarnation: int,
        holding: MirrorHolding,
        *,
        accept_owner: Callable[[Hello], str | None] = lambda hello: None,
        choose_holding: Callable[[Hello], MirrorHolding] | None = None,
        max_data: int = DEFAULT_MAX_DATA,
        takes_over: bool = False,
    ) -> None:
        super().__init__(_TO_PARTNER, max_data + _MIRROR.size)
        self.holding = holding
        self._resynced = False  # a session begins with RESYNC: nothing is held across sessions
        self._accept_owner = accept_owner
        self._choose_holding = choose_holding
        self._acks: dict[int, int] = {}  # vv -> last seq processed, its ACK not yet queued
        # takes_over: this partner replays what it holds when the owner dies (HELLO_TAKES_OVER)
        self._out += encode_hello(epoch, incarnation, node, takes_over=takes_over)

    def _hello_received(self, hello: Hello) -> None:
        if self._choose_holding is not None:
            self.holding = self._choose_holding(hello)
        if hello.node != self.holding.owner:
            raise MirrorViolation(
                f"this partner holds the mirror of node {self.holding.owner!r}, not {hello.node!r}"
            )
        refusal = self._accept_owner(hello)
        if refusal is not None:
            raise MirrorViolation(refusal)
        holding = self.holding
        if hello.epoch < holding.epoch:
            raise MirrorViolation(f"epoch {hello.epoch} is older than epoch {holding.epoch} already seen")
        if len(holding) and hello.incarnation != holding.incarnation:
            # A restarted owner lost its cache; the writes held here are the only copy of what it
            # acknowledged.  A RESYNC would drop them: they must be replayed (takeover) first.
            raise MirrorViolation(
                f"this partner holds {len(holding)} writes of an earlier process of node {hello.node!r};"
                " they must be replayed before it mirrors again"
            )

    def _handle(self, kind: MessageType, body: memoryview) -> Event:
        assert self.peer is not None
        holding = self.holding
        if kind is MessageType.RESYNC:
            (epoch,) = _fixed(body, _U64, kind)
            if epoch != self.peer.epoch:
                raise MirrorViolation(f"RESYNC to epoch {epoch}, the session's is {self.peer.epoch}")
            holding.clear()
            holding.epoch = epoch
            holding.incarnation = self.peer.incarnation
            holding.session = self  # an older connection of this owner may deliver nothing more
            self._resynced = True
            return Resynced(epoch)
        if kind is MessageType.PING:
            (token,) = _fixed(body, _U64, kind)
            self._queue_acks()  # PONG: everything before the PING is done, its ACKs included
            self._out += frame(MessageType.PONG, _U64.pack(token))
            return Ping(token)
        if not self._resynced:
            raise MirrorViolation(f"{kind.name} before RESYNC")
        if holding.session is not self:
            # Two connections of one owner: a half-open old one must not add to (or drop from)
            # what the new session's RESYNC started; its sequence numbers mean nothing now.
            raise MirrorViolation(f"{kind.name} on a session superseded by a newer RESYNC")
        if kind is MessageType.MIRROR:
            if len(body) <= _MIRROR.size:
                raise MirrorViolation("MIRROR without data")
            epoch, vv, seq, key, vv_region, offset, crc = _MIRROR.unpack_from(body)
            if epoch != self.peer.epoch:
                raise MirrorViolation(f"MIRROR with epoch {epoch}, the session's is {self.peer.epoch}")
            data = bytes(body[_MIRROR.size :])
            if int(google_crc32c.value(data)) != crc:
                raise MirrorViolation(f"MIRROR vv={vv} seq={seq}: data CRC mismatch")
            holding.add(HeldWrite(vv, seq, key, vv_region, offset, data))
            self._acks[vv] = seq
            return Mirrored(vv, seq, key, len(data))
        if kind is MessageType.DESTAGED:
            vv, seq, key, upto = _fixed(body, _DESTAGED, kind)
            holding.drop_destaged(vv, key, seq, upto)
            self._acks[vv] = seq
            return Destaged(vv, seq, key, upto)
        if kind is MessageType.RELEASE:
            vv, seq, key = _fixed(body, _VV_SEQ_KEY, kind)
            holding.release(vv, key, seq)
            self._acks[vv] = seq
            return Released(vv, seq, key)
        raise AssertionError(f"unhandled {kind.name}")  # _TO_PARTNER lists exactly the kinds above

    def _queue_acks(self) -> None:
        if self._acks:
            for vv, seq in self._acks.items():
                self._out += _ACK_FRAME.pack(MAGIC, MessageType.ACK, 0, _VV_SEQ.size, vv, seq)
            self._acks.clear()


# --- the owner's side ---------------------------------------------------------------------------
class OwnerConnection(_Core):
    """The owner's end of one link: numbers what it sends, knows which regions the partner may
    still hold, checks every acknowledgement against what is outstanding.

    The first thing sent after HELLO is ``resync()``: a session starts with the partner's
    holding empty, and the owner then sends what it still has dirty (or nothing, when it
    destaged everything while the partner was away)."""

    def __init__(
        self, node: str, epoch: int, incarnation: int, *, max_body: int = 4096, to_itself: bool = False
    ) -> None:
        super().__init__(_TO_OWNER, max_body)
        self.node = node
        self.epoch = epoch
        # The volumes of node ``node`` served by its partner's takeover, mirrored to ``node``
        # itself (rejoined as partner): the one link whose partner answers with the same name.
        self.to_itself = to_itself
        self._next_seq: dict[int, int] = {}
        # vv -> (seq, key) of every message awaiting its ACK, in sequence order: the sequences of
        # one volume are consecutive, and a cumulative ACK takes them from the front
        self._outstanding: dict[int, deque[tuple[int, int]]] = {}
        self._held: dict[int, tuple[int, int]] = {}  # key -> (vv, last seq mirrored): partner may hold it
        self._releasing: dict[int, tuple[int, int]] = {}  # key -> (vv, seq) of an unacknowledged RELEASE
        self._destaging: dict[tuple[int, int], tuple[int, int]] = {}  # (vv, seq) of a DESTAGED -> (key, upto)
        self._out += encode_hello(epoch, incarnation, node)

    def _seq(self, vv: int, key: int) -> int:
        """The next sequence number of ``vv``, for a message about region ``key`` that awaits
        its ACK from now on."""
        seq = self._next_seq.get(vv, 0) + 1
        self._next_seq[vv] = seq
        waiting = self._outstanding.get(vv)
        if waiting is None:
            waiting = self._outstanding[vv] = deque()
        waiting.append((seq, key))
        return seq

    @property
    def outstanding(self) -> dict[tuple[int, int], int]:
        """``(vv, seq) -> key`` of every message awaiting its ACK."""
        return {(vv, seq): key for vv, waiting in self._outstanding.items() for seq, key in waiting}

    def resync(self) -> None:
        """Start the session over: the partner drops everything it held from this node."""
        self._held.clear()
        self._out += frame(MessageType.RESYNC, _U64.pack(self.epoch))

    def mirror(
        self, vv: int, key: int, vv_region: int, offset: int, data: bytes | bytearray | memoryview
    ) -> int:
        """Send one cached write; returns its sequence number (wait for ``Acked(vv, seq)``)."""
        assert not self.closed, "mirror on a closed link"
        assert len(data) > 0
        held = self._held.get(key)
        assert held is None or held[0] == vv, f"region {key:#x} is held for vv {held[0]}, not {vv}"
        assert key not in self._releasing, f"region {key:#x} mirrored while its RELEASE is unacknowledged"
        seq = self._seq(vv, key)
        if type(data) is not bytes:
            data = bytes(data)  # google_crc32c takes bytes only; a copy costs less than zlib's CRC
        out = self._out
        out += _MIRROR_FRAME.pack(
            MAGIC,
            MessageType.MIRROR,
            0,
            _MIRROR.size + len(data),
            self.epoch,
            vv,
            seq,
            key,
            vv_region,
            offset,
            google_crc32c.value(data),
        )
        out += data
        self._held[key] = (vv, seq)
        return seq

    def last_mirrored(self, key: int) -> tuple[int, int] | None:
        """``(vv, seq)`` of the last write of region ``key`` the partner may hold, or None."""
        return self._held.get(key)

    def destaged(self, vv: int, key: int, upto: int) -> int | None:
        """Region ``key`` is durable on its LD up to sequence ``upto``: the partner may drop those
        entries.  Returns the DESTAGED's own sequence number (None when nothing is held): the
        region counts as dropped only once that is acknowledged."""
        held = self._held.get(key)
        if held is None or held[0] != vv:
            return None
        seq = self._seq(vv, key)
        self._out += frame(MessageType.DESTAGED, _DESTAGED.pack(vv, seq, key, upto))
        self._destaging[(vv, seq)] = (key, upto)
        return seq

    def release(self, vv: int, key: int) -> int | None:
        """Region ``key`` leaves ``vv`` (trim, delete, zeroed in place).  Returns the sequence
        number whose ACK must arrive before the region is reused or rewritten outside the
        cache, or None when the partner holds nothing of it."""
        held = self._held.pop(key, None)
        if held is None:
            return None
        assert held[0] == vv, f"region {key:#x} released for vv {vv}, held for vv {held[0]}"
        seq = self._seq(vv, key)
        self._out += frame(MessageType.RELEASE, _VV_SEQ_KEY.pack(vv, seq, key))
        self._releasing[key] = (vv, seq)
        return seq

    def region_settled(self, key: int) -> bool:
        """Whether the partner is known to hold nothing of region ``key``."""
        return key not in self._held and key not in self._releasing

    def ping(self, token: int) -> None:
        self._out += frame(MessageType.PING, _U64.pack(token))

    def _acknowledged(self, vv: int, seq: int, key: int) -> None:
        """Message ``(vv, seq)`` about region ``key`` was processed by the partner."""
        if self._releasing.get(key) == (vv, seq):
            del self._releasing[key]
        destaged = self._destaging.pop((vv, seq), None)
        if destaged is not None:
            held = self._held.get(key)
            if held is not None and held[0] == vv and held[1] <= destaged[1]:
                del self._held[key]  # nothing newer was mirrored since: the partner holds none of it

    def _hello_received(self, hello: Hello) -> None:
        if (hello.node == self.node) != self.to_itself:
            if self.to_itself:
                raise MirrorViolation(f"the partner calls itself {hello.node!r}, not {self.node!r}")
            raise MirrorViolation(f"the partner calls itself {hello.node!r}, this node's own name")

    def _handle(self, kind: MessageType, body: memoryview) -> Event:
        if kind is MessageType.ACK:
            vv, seq = _fixed(body, _VV_SEQ, kind)
            waiting = self._outstanding.get(vv)
            # The sequences waiting are consecutive: seq is one of them if it lies in their range.
            if not waiting or not waiting[0][0] <= seq <= waiting[-1][0]:
                raise MirrorViolation(f"ACK of vv={vv} seq={seq}, which is not outstanding")
            bookkeeping = bool(self._releasing or self._destaging)
            while waiting and waiting[0][0] <= seq:
                done, key = waiting.popleft()
                if bookkeeping:
                    self._acknowledged(vv, done, key)
            return Acked(vv, seq)
        assert kind is MessageType.PONG
        (token,) = _fixed(body, _U64, kind)
        return Pong(token)
