"""The mirror link's sans-IO cores (node/mirror_protocol.py), without sockets: golden frames,
streams fed whole, byte by byte and with trailing data, every rule the partner checks at the
edge, the ordering of releases against mirrored writes, and hypothesis fuzzing and a state
machine against a model of what the partner must hold."""

from __future__ import annotations

import struct

import google_crc32c
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from thinblock.node.mirror_protocol import (
    HEADER_SIZE,
    MAGIC,
    NEED_DATA,
    VERSION,
    Acked,
    ConnectionClosed,
    Destaged,
    Hello,
    MessageType,
    Mirrored,
    MirrorHolding,
    OwnerConnection,
    PartnerConnection,
    Ping,
    Pong,
    ProtocolError,
    Released,
    RemoteError,
    Resynced,
    data_crc,
    encode_hello,
    frame,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEY_A = 7 << 32 | 12  # LD 7 region 12
KEY_B = 7 << 32 | 13


def partner(holding: MirrorHolding | None = None, **kw: object) -> PartnerConnection:
    return PartnerConnection("n2", 3, 22, holding if holding is not None else MirrorHolding("n1"), **kw)  # type: ignore[arg-type]


def drain(conn: OwnerConnection | PartnerConnection) -> list[object]:
    events = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)


def feed(conn: OwnerConnection | PartnerConnection, data: bytes, *, step: int | None = None) -> list[object]:
    """Feed ``data`` whole (``step`` None) or in pieces of ``step`` bytes, draining after each."""
    events: list[object] = []
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        conn.receive_data(piece)
        events += drain(conn)
    return events


def session() -> tuple[OwnerConnection, PartnerConnection]:
    owner = OwnerConnection("n1", 3, 11)
    peer = partner()
    assert feed(owner, peer.data_to_send()) == [Hello(VERSION, 3, 22, "n2")]
    owner.resync()
    assert feed(peer, owner.data_to_send()) == [Hello(VERSION, 3, 11, "n1"), Resynced(3)]
    return owner, peer


@pytest.mark.parametrize("takes_over", [False, True])
def test_the_partner_says_in_its_hello_whether_it_takes_over(takes_over: bool) -> None:
    owner = OwnerConnection("n1", 3, 11)
    peer = partner(takes_over=takes_over)
    hello = peer.data_to_send()
    assert struct.unpack_from(">IHHI", hello)[2] == (1 if takes_over else 0)  # the header's flags
    for step in (None, 1):
        fresh = OwnerConnection("n1", 3, 11)
        assert feed(fresh, hello + encode_hello(9, 9, "x")[:3], step=step) == [
            Hello(VERSION, 3, 22, "n2", takes_over=takes_over)
        ]
    assert feed(owner, hello) == [Hello(VERSION, 3, 22, "n2", takes_over=takes_over)]


def test_an_owner_refuses_unknown_hello_flags() -> None:
    owner = OwnerConnection("n1", 3, 11)
    bad = frame(MessageType.HELLO, struct.pack(">HQQH", VERSION, 3, 22, 2) + b"n2", flags=0x2)
    (event,) = feed(owner, bad)
    assert isinstance(event, ProtocolError) and "flags" in event.reason


def owner_stream() -> bytes:
    """HELLO, RESYNC, two MIRRORs, a DESTAGED and a RELEASE and a PING, as an owner sends them."""
    owner = OwnerConnection("n1", 3, 11)
    owner.resync()
    owner.mirror(5, KEY_A, 40, 0, b"a" * 4096)
    owner.mirror(5, KEY_A, 40, 4096, b"b" * 512)
    owner.destaged(5, KEY_A, 1)
    owner.release(5, KEY_A)
    owner.ping(99)
    return owner.data_to_send()


EXPECTED = [
    Hello(VERSION, 3, 11, "n1"),
    Resynced(3),
    Mirrored(5, 1, KEY_A, 4096),
    Mirrored(5, 2, KEY_A, 512),
    Destaged(5, 3, KEY_A, 1),
    Released(5, 4, KEY_A),
    Ping(99),
]


# --- golden bytes -------------------------------------------------------------------------------
def test_golden_frames() -> None:
    hello = encode_hello(3, 11, "n1")
    assert hello == struct.pack(">IHHI", MAGIC, 1, 0, 22) + struct.pack(">HQQH", 2, 3, 11, 2) + b"n1"
    owner = OwnerConnection("n1", 3, 11)
    owner.data_to_send()
    assert owner.mirror(5, KEY_A, 40, 16, b"xyz") == 1
    assert data_crc(b"123456789") == 0xE3069283  # CRC32C's check value (Castagnoli), not zlib's CRC32
    crc = google_crc32c.value(b"xyz")
    assert owner.data_to_send() == (
        struct.pack(">IHHI", MAGIC, 2, 0, 48 + 3)
        + struct.pack(">QQQQQII", 3, 5, 1, KEY_A, 40, 16, crc)
        + b"xyz"
    )
    assert owner.release(5, KEY_A) == 2
    assert owner.data_to_send() == struct.pack(">IHHI", MAGIC, 5, 0, 24) + struct.pack(">QQQ", 5, 2, KEY_A)


# --- whole, byte by byte, trailing data ---------------------------------------------------------
@pytest.mark.parametrize("step", [None, 1, 7, 4096])
def test_partner_parses_the_stream_in_any_pieces(step: int | None) -> None:
    peer = partner()
    assert feed(peer, owner_stream(), step=step) == EXPECTED
    assert peer.holding.regions() == set()  # released


def test_trailing_partial_frame_waits_then_completes() -> None:
    data = owner_stream()
    follow = frame(MessageType.PING, struct.pack(">Q", 100))
    peer = partner()
    assert feed(peer, data + follow[:5]) == EXPECTED  # a partial header: NEED_DATA, not an error
    assert feed(peer, follow[5:]) == [Ping(100)]
    assert feed(peer, b"") == [ConnectionClosed()]


def test_stream_ending_inside_a_frame_is_an_error() -> None:
    data = owner_stream()
    peer = partner()
    events = feed(peer, data[:-3]) + feed(peer, b"")
    assert events[:-1] == EXPECTED[:-1]
    assert isinstance(events[-1], ProtocolError) and "inside a frame" in events[-1].reason


def test_owner_round_trip_acknowledgements() -> None:
    owner, peer = session()
    s1 = owner.mirror(5, KEY_A, 40, 0, b"a" * 100)
    s2 = owner.mirror(6, KEY_B, 0, 0, b"b" * 100)
    assert (s1, s2) == (1, 1)  # per-volume sequences
    owner.ping(1)
    assert feed(peer, owner.data_to_send()) == [
        Mirrored(5, 1, KEY_A, 100),
        Mirrored(6, 1, KEY_B, 100),
        Ping(1),
    ]
    assert feed(owner, peer.data_to_send(), step=1) == [Acked(5, 1), Acked(6, 1), Pong(1)]
    assert owner.outstanding == {}


def test_the_partner_acknowledges_a_batch_with_one_ack_per_volume_before_the_pong() -> None:
    owner, peer = session()
    for i in range(3):
        owner.mirror(5, KEY_A, 40, i * 10, b"a" * 10)
    owner.mirror(6, KEY_B, 0, 0, b"b")
    owner.destaged(5, KEY_A, 2)
    owner.mirror(6, KEY_B, 0, 1, b"c")
    owner.ping(7)
    feed(peer, owner.data_to_send(), step=5)  # however the batch was cut, one ACK per volume
    answer = peer.data_to_send()
    kinds, _ = frames_of(answer)
    assert kinds == [MessageType.ACK, MessageType.ACK, MessageType.PONG]
    assert answer[HEADER_SIZE : HEADER_SIZE + 16] == struct.pack(">QQ", 5, 4)  # seq 4: the DESTAGED
    assert feed(owner, answer, step=1) == [Acked(5, 4), Acked(6, 2), Pong(7)]
    assert owner.outstanding == {}
    assert owner.last_mirrored(KEY_A) == (5, 3)  # seq 3 came after the destage: may still be held


def test_acks_kept_back_go_before_an_error() -> None:
    peer = partner()
    feed(peer, START + mirror_body(3, 5, 1, KEY_A, b"d") + mirror_body(3, 5, 1, KEY_A, b"e"))
    kinds, _ = frames_of(peer.data_to_send())
    assert kinds == [MessageType.HELLO, MessageType.ACK, MessageType.ERROR]


def test_owner_refuses_an_ack_outside_what_is_outstanding() -> None:
    owner, peer = session()
    owner.mirror(5, KEY_A, 40, 0, b"a")
    owner.mirror(5, KEY_A, 40, 1, b"b")
    feed(peer, owner.data_to_send())
    assert feed(owner, frame(MessageType.ACK, struct.pack(">QQ", 5, 1))) == [Acked(5, 1)]
    events = feed(owner, frame(MessageType.ACK, struct.pack(">QQ", 5, 1)))  # again: not outstanding
    assert isinstance(events[-1], ProtocolError) and "not outstanding" in events[-1].reason
    owner, peer = session()
    owner.mirror(5, KEY_A, 40, 0, b"a")
    events = feed(owner, frame(MessageType.ACK, struct.pack(">QQ", 5, 2)))  # never sent
    assert isinstance(events[-1], ProtocolError) and "not outstanding" in events[-1].reason


def test_a_partner_refuses_an_owner_of_the_previous_version() -> None:
    version_1 = frame(MessageType.HELLO, struct.pack(">HQQH", 1, 3, 11, 2) + b"n1")
    (event,) = feed(partner(), version_1)
    assert isinstance(event, ProtocolError) and "version 1 is not supported" in event.reason


# --- the holding: destage watermark, release, replay order --------------------------------------
def test_destaged_drops_only_entries_up_to_its_sequence() -> None:
    owner, peer = session()
    owner.mirror(5, KEY_A, 40, 0, b"1" * 10)
    owner.mirror(5, KEY_A, 40, 10, b"2" * 10)
    assert owner.destaged(5, KEY_A, 1) == 3  # the destage covered seq 1 only; seq 2 came after it
    feed(owner, feed_back(peer, owner))
    assert [w.seq for w in peer.holding.held_for(KEY_A)] == [2]
    assert owner.last_mirrored(KEY_A) == (5, 2)  # the partner may still hold seq 2
    assert owner.destaged(5, KEY_A, 2) == 4
    assert feed(peer, owner.data_to_send()) == [Destaged(5, 4, KEY_A, 2)]
    assert peer.holding.held_for(KEY_A) == [] and peer.holding.held_bytes == 0
    assert not owner.region_settled(KEY_A)  # not before the ACK: the DESTAGED may never arrive
    assert feed(owner, peer.data_to_send()) == [Acked(5, 4)]
    assert owner.region_settled(KEY_A)


def test_release_after_an_unacknowledged_destaged_still_waits() -> None:
    """The bug the state machine found: a region destaged (DESTAGED sent, not yet processed by
    the partner) and then trimmed was called settled, while the partner still held its old data."""
    owner, peer = session()
    owner.mirror(5, KEY_A, 40, 0, b"old")
    feed(owner, feed_back(peer, owner))
    owner.destaged(5, KEY_A, 1)
    assert owner.release(5, KEY_A) == 3
    assert not owner.region_settled(KEY_A)
    feed(owner, feed_back(peer, owner))
    assert owner.region_settled(KEY_A) and peer.holding.held_for(KEY_A) == []


def feed_back(peer: PartnerConnection, owner: OwnerConnection) -> bytes:
    """Deliver what the owner sent; return the partner's answer."""
    for event in feed(peer, owner.data_to_send()):
        assert not isinstance(event, ProtocolError), event
    return peer.data_to_send()


def test_release_is_ordered_after_the_writes_and_settles_on_its_ack() -> None:
    owner, peer = session()
    owner.mirror(5, KEY_A, 40, 0, b"old" * 10)
    seq = owner.release(5, KEY_A)
    assert seq == 2 and not owner.region_settled(KEY_A)
    assert owner.release(5, KEY_B) is None  # never mirrored: nothing to wait for
    events = feed(peer, owner.data_to_send())
    assert events == [Mirrored(5, 1, KEY_A, 30), Released(5, 2, KEY_A)]
    assert peer.holding.held_for(KEY_A) == []
    assert feed(owner, peer.data_to_send()) == [Acked(5, 2)]  # cumulative: the write and the RELEASE
    assert owner.region_settled(KEY_A)


def test_replay_order_is_per_volume_sequence_order() -> None:
    owner, peer = session()
    owner.mirror(6, KEY_B, 1, 0, b"x")
    owner.mirror(5, KEY_A, 2, 0, b"y")
    owner.mirror(6, KEY_B, 1, 0, b"z")
    feed(peer, owner.data_to_send())
    assert [(w.vv, w.seq, w.data) for w in peer.holding.in_replay_order()] == [
        (5, 1, b"y"),
        (6, 1, b"x"),
        (6, 2, b"z"),
    ]


def test_resync_drops_everything_and_sequences_restart() -> None:
    owner, peer = session()
    owner.mirror(5, KEY_A, 40, 0, b"a")
    feed(peer, owner.data_to_send())
    # The link drops; a new session of the same owner process starts over.
    owner2 = OwnerConnection("n1", 3, 11)
    peer2 = PartnerConnection("n2", 3, 22, peer.holding)
    feed(owner2, peer2.data_to_send())
    owner2.resync()
    owner2.mirror(5, KEY_B, 41, 0, b"b")
    assert feed(peer2, owner2.data_to_send())[-1] == Mirrored(5, 1, KEY_B, 1)
    assert peer.holding.regions() == {KEY_B}


# --- rules at the edge --------------------------------------------------------------------------
def mirror_body(epoch: int, vv: int, seq: int, key: int, data: bytes, crc: int | None = None) -> bytes:
    crc = google_crc32c.value(data) if crc is None else crc
    return frame(MessageType.MIRROR, struct.pack(">QQQQQII", epoch, vv, seq, key, 0, 0, crc) + data)


START = encode_hello(3, 11, "n1") + frame(MessageType.RESYNC, struct.pack(">Q", 3))


def frames_of(data: bytes) -> tuple[list[int], bytes]:
    """The types of the frames in ``data`` and the body of the last one."""
    kinds, pos, body = [], 0, b""
    while pos < len(data):
        magic, kind, _, length = struct.unpack_from(">IHHI", data, pos)
        assert magic == MAGIC
        kinds.append(kind)
        body = data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
        pos += HEADER_SIZE + length
    assert pos == len(data)
    return kinds, body


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        (b"\x00" * HEADER_SIZE, "magic"),
        (struct.pack(">IHHI", MAGIC, 77, 0, 0), "unknown message type"),
        (
            struct.pack(">IHHI", MAGIC, 3, 0, 16) + bytes(16),
            "not valid in this direction",
        ),  # ACK to a partner
        (struct.pack(">IHHI", MAGIC, 1, 4, 0), "flags"),
        (encode_hello(3, 11, "n1", takes_over=True), "flags"),  # only a partner announces it
        (struct.pack(">IHHI", MAGIC, 2, 0, 1 << 30), "over the limit"),
        (frame(MessageType.PING, bytes(8)), "before HELLO"),
        (encode_hello(3, 11, "n1") + encode_hello(3, 11, "n1"), "second HELLO"),
        (frame(MessageType.HELLO, struct.pack(">HQQH", 9, 3, 11, 2) + b"n1"), "version"),
        (frame(MessageType.HELLO, struct.pack(">HQQH", 1, 3, 11, 5) + b"n1"), "length"),
        (frame(MessageType.HELLO, struct.pack(">HQQH", 1, 3, 11, 2) + b"\xff\xfe"), "UTF-8"),
        (encode_hello(3, 11, "n9"), "holds the mirror of node 'n1'"),
        (encode_hello(3, 11, "n1") + mirror_body(3, 5, 1, KEY_A, b"d"), "before RESYNC"),
        (START + mirror_body(2, 5, 1, KEY_A, b"d"), "epoch 2"),
        (START + mirror_body(3, 5, 1, KEY_A, b"d", crc=1), "CRC"),
        (START + frame(MessageType.MIRROR, bytes(48)), "without data"),
        (START + mirror_body(3, 5, 2, KEY_A, b"d") + mirror_body(3, 5, 2, KEY_A, b"e"), "not after seq 2"),
        (START + mirror_body(3, 5, 1, KEY_A, b"d") + mirror_body(3, 6, 1, KEY_A, b"e"), "held for vv 5"),
        (
            START + frame(MessageType.DESTAGED, struct.pack(">QQQQ", 5, 1, KEY_A, 1)),
            "not a sequence sent before",
        ),
        (
            START
            + mirror_body(3, 5, 2, KEY_A, b"d")
            + frame(MessageType.DESTAGED, struct.pack(">QQQQ", 5, 2, KEY_A, 1)),
            "not after seq 2",
        ),
        (START + frame(MessageType.DESTAGED, bytes(23)), "not 32"),
        (START + frame(MessageType.RESYNC, struct.pack(">Q", 4)), "RESYNC to epoch 4"),
        (
            START
            + mirror_body(3, 5, 1, KEY_A, b"d")
            + frame(MessageType.RELEASE, struct.pack(">QQQ", 6, 1, KEY_A)),
            "RELEASE",
        ),
    ],
)
def test_partner_refuses(stream: bytes, reason: str) -> None:
    for step in (None, 1):
        peer = partner()
        peer.data_to_send()
        events = feed(peer, stream, step=step)
        assert isinstance(events[-1], ProtocolError), events
        assert reason in events[-1].reason
        kinds, last_body = frames_of(peer.data_to_send())
        assert kinds[-1] == MessageType.ERROR and MessageType.ERROR not in kinds[:-1]
        assert reason.encode() in last_body or reason == "UTF-8"
        peer.receive_data(b"more")
        assert peer.next_event() is NEED_DATA  # the connection is over: nothing more is parsed


def test_mirror_full_is_refused() -> None:
    peer = partner(MirrorHolding("n1", max_bytes=100))
    events = feed(
        peer, START + mirror_body(3, 5, 1, KEY_A, b"x" * 60) + mirror_body(3, 5, 2, KEY_A, b"y" * 60)
    )
    assert isinstance(events[-1], ProtocolError) and "mirror full" in events[-1].reason
    assert peer.holding.held_bytes == 60


def test_policy_refuses_a_fenced_owner() -> None:
    peer = partner(
        accept_owner=lambda hello: "lease epoch 4 is held; 3 is fenced" if hello.epoch < 4 else None
    )
    events = feed(peer, START)
    assert isinstance(events[-1], ProtocolError) and "fenced" in events[-1].reason


def test_older_epoch_than_held_is_refused() -> None:
    holding = MirrorHolding("n1")
    holding.epoch = 5
    events = feed(partner(holding), START)
    assert isinstance(events[-1], ProtocolError) and "older than epoch 5" in events[-1].reason


def test_an_older_session_of_the_same_owner_is_superseded() -> None:
    """A half-open old connection must not add to what a newer session's RESYNC started."""
    owner, peer = session()
    owner.mirror(5, KEY_A, 40, 0, b"late")
    late = owner.data_to_send()
    owner2 = OwnerConnection("n1", 3, 11)
    peer2 = PartnerConnection("n2", 3, 22, peer.holding)
    feed(owner2, peer2.data_to_send())
    owner2.resync()
    feed(peer2, owner2.data_to_send())
    events = feed(peer, late)  # the old connection delivers after the new RESYNC
    assert isinstance(events[-1], ProtocolError) and "superseded" in events[-1].reason
    assert len(peer.holding) == 0


def test_a_restarted_owner_cannot_resync_away_what_it_acknowledged() -> None:
    owner, peer = session()
    owner.mirror(5, KEY_A, 40, 0, b"acknowledged")
    feed(peer, owner.data_to_send())
    restarted = PartnerConnection("n2", 3, 22, peer.holding)
    events = feed(restarted, encode_hello(4, 12, "n1"))  # a new process (incarnation 12)
    assert isinstance(events[-1], ProtocolError) and "earlier process" in events[-1].reason
    assert len(peer.holding) == 1


def test_owner_refuses_unknown_acks_and_reports_remote_errors() -> None:
    owner = OwnerConnection("n1", 3, 11)
    events = feed(owner, encode_hello(3, 22, "n2") + frame(MessageType.ACK, struct.pack(">QQ", 5, 1)))
    assert isinstance(events[-1], ProtocolError) and "not outstanding" in events[-1].reason
    owner = OwnerConnection("n1", 3, 11)
    assert feed(owner, encode_hello(3, 22, "n2") + frame(MessageType.ERROR, b"mirror full"))[
        -1
    ] == RemoteError("mirror full")
    owner = OwnerConnection("n1", 3, 11)
    events = feed(owner, encode_hello(3, 22, "n1"))
    assert isinstance(events[-1], ProtocolError) and "own name" in events[-1].reason
    owner = OwnerConnection("n1", 3, 11)
    events = feed(owner, encode_hello(3, 22, "n2") + mirror_body(3, 5, 1, KEY_A, b"d"))
    assert isinstance(events[-1], ProtocolError) and "not valid in this direction" in events[-1].reason
    # A takeover mirroring the old owner's volumes back to it: its partner must be that node.
    owner = OwnerConnection("n1", 3, 11, to_itself=True)
    assert not any(isinstance(e, ProtocolError) for e in feed(owner, encode_hello(3, 22, "n1")))
    owner = OwnerConnection("n1", 3, 11, to_itself=True)
    events = feed(owner, encode_hello(3, 22, "n2"))
    assert isinstance(events[-1], ProtocolError) and "not 'n1'" in events[-1].reason


# --- fuzzing ------------------------------------------------------------------------------------
DOCUMENTED = (
    Hello,
    Mirrored,
    Destaged,
    Released,
    Resynced,
    Ping,
    ConnectionClosed,
    ProtocolError,
    RemoteError,
)


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(1, 64), max_size=20))
def test_fuzz_partner_random_bytes(data: bytes, cuts: list[int]) -> None:
    peer = partner(MirrorHolding("n1", max_bytes=4096), max_data=1024)
    pos = 0
    events: list[object] = []
    for cut in [*cuts, len(data)]:
        peer.receive_data(data[pos : pos + cut])
        events += drain(peer)
        pos += cut
    peer.receive_data(b"")
    events += drain(peer)
    assert all(isinstance(e, DOCUMENTED) for e in events)
    assert isinstance(events[-1], ConnectionClosed | ProtocolError | RemoteError)


@FUZZ
@given(st.data())
def test_fuzz_mutated_valid_streams(data: st.DataObject) -> None:
    """Flip bytes of a valid stream: the core ends in ProtocolError or parses it, never raises,
    and whatever it reports before the damage is what the undamaged stream gives."""
    stream = bytearray(owner_stream())
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(stream) - 1), st.integers(0, 255)), max_size=3))
    for pos, value in flips:
        stream[pos] = value
    step = data.draw(st.integers(1, 64))
    peer = partner()
    events = feed(peer, bytes(stream), step=step) + feed(peer, b"")
    assert all(isinstance(e, DOCUMENTED) for e in events)
    first_damage = min((p for p, v in flips if v != owner_stream()[p]), default=len(stream))
    whole = feed(partner(), owner_stream()[:first_damage])
    for got, want in zip(events, whole[: max(0, len(whole) - 1)], strict=False):
        assert got == want


# --- a state machine against a model ------------------------------------------------------------
class MirrorLink(RuleBasedStateMachine):
    """An owner and a partner joined by a stream that delivers in order but at random moments.
    The model: for every region, the writes the owner acknowledged (partner ACKed) and has not
    destaged.  Invariants: the partner holds every such write; a region whose RELEASE was
    acknowledged is held by nobody; replaying the holding gives the owner's latest data."""

    def __init__(self) -> None:
        super().__init__()
        self.owner, self.peer = session()
        self.to_peer = bytearray()
        self.to_owner = bytearray()
        self.sent: dict[tuple[int, int], tuple[int, int, bytes]] = {}  # (vv, seq) -> (key, offset, data)
        self.acked: set[tuple[int, int]] = set()
        self.destaged_upto: dict[int, int] = {}  # key -> seq known durable
        self.owner_of: dict[int, int] = {}  # key -> vv it belongs to
        self.releasing: dict[int, tuple[int, int]] = {}
        self.settled_keys: set[int] = set()
        self.obsolete: set[tuple[int, int]] = set()  # writes of a region released since

    def _released(self, key: int) -> None:
        self.owner_of.pop(key)
        self.settled_keys.add(key)
        self.obsolete |= {vs for vs, sent in self.sent.items() if sent[0] == key}

    def _move(self) -> None:
        self.to_peer += self.owner.data_to_send()
        self.to_owner += self.peer.data_to_send()

    @rule(
        vv=st.integers(1, 3),
        region=st.integers(0, 3),
        offset=st.integers(0, 8),
        data=st.binary(min_size=1, max_size=8),
    )
    def write(self, vv: int, region: int, offset: int, data: bytes) -> None:
        key = KEY_A + region
        if self.owner_of.get(key, vv) != vv or key in self.releasing:
            return  # the cache never mirrors a region for two volumes, nor during its release
        self.owner_of[key] = vv
        seq = self.owner.mirror(vv, key, region, offset, data)
        self.sent[(vv, seq)] = (key, offset, data)
        self.settled_keys.discard(key)
        self._move()

    @rule(region=st.integers(0, 3))
    def destage(self, region: int) -> None:
        key = KEY_A + region
        held = self.owner.last_mirrored(key)
        if held is not None:
            self.owner.destaged(held[0], key, held[1])
            self.destaged_upto[key] = held[1]
            self._move()

    @rule(region=st.integers(0, 3))
    def release(self, region: int) -> None:
        key = KEY_A + region
        vv = self.owner_of.get(key)
        if vv is None or key in self.releasing:
            return
        seq = self.owner.release(vv, key)
        if seq is None:
            assert self.owner.region_settled(key)
            self._released(key)
        else:
            self.releasing[key] = (vv, seq)
        self._move()

    @precondition(lambda self: bool(self.to_peer))
    @rule(n=st.integers(1, 200))
    def deliver_to_partner(self, n: int) -> None:
        chunk, self.to_peer = bytes(self.to_peer[:n]), self.to_peer[n:]
        self.peer.receive_data(chunk)
        for event in drain(self.peer):
            assert not isinstance(event, ProtocolError), event
        self._move()

    @precondition(lambda self: bool(self.to_owner))
    @rule(n=st.integers(1, 200))
    def deliver_to_owner(self, n: int) -> None:
        chunk, self.to_owner = bytes(self.to_owner[:n]), self.to_owner[n:]
        self.owner.receive_data(chunk)
        for event in drain(self.owner):
            assert isinstance(event, Acked), event
            # Cumulative: every message of the volume up to event.seq.
            self.acked |= {(vv, seq) for vv, seq in self.sent if vv == event.vv and seq <= event.seq}
            for key, (vv, seq) in list(self.releasing.items()):
                if vv == event.vv and seq <= event.seq:
                    assert self.owner.region_settled(key)
                    del self.releasing[key]
                    self._released(key)

    @invariant()
    def partner_holds_every_acknowledged_undestaged_write(self) -> None:
        held = {(w.vv, w.seq) for key in self.peer.holding.regions() for w in self.peer.holding.held_for(key)}
        for vv, seq in self.acked:
            if (vv, seq) not in self.sent or (vv, seq) in self.obsolete:
                continue  # a RELEASE's or DESTAGED's ACK, or a write of a region released since
            key = self.sent[(vv, seq)][0]
            if key in self.releasing or self.owner_of.get(key) != vv:
                continue  # being released: the cache no longer needs it
            if seq > self.destaged_upto.get(key, 0):
                assert (vv, seq) in held, (vv, seq)

    @invariant()
    def a_released_region_is_held_by_nobody(self) -> None:
        for key in self.settled_keys:
            assert self.peer.holding.held_for(key) == [], key

    @invariant()
    def held_bytes_add_up(self) -> None:
        total = sum(
            len(w.data) for key in self.peer.holding.regions() for w in self.peer.holding.held_for(key)
        )
        assert total == self.peer.holding.held_bytes


TestMirrorLink = MirrorLink.TestCase
TestMirrorLink.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
