"""iSCSI PDU codec (RFC 7143 section 11), sans-IO: bytes in, ``Pdu`` out, and back.

A PDU is a 48-byte Basic Header Segment (BHS), optional Additional Header Segments (AHS,
``TotalAHSLength`` 4-byte words), an optional header digest, a data segment padded to a
multiple of 4 bytes and an optional data digest.  Digests are CRC32C (RFC 7143 13.1:
"the CRC32C ... polynomial 0x11EDC6F41"), used only once negotiated.

``PduReader`` frames PDUs from a byte stream.  Everything a peer may get wrong raises
``PduError``: a length past the negotiated ``MaxRecvDataSegmentLength`` (so memory stays
bounded: nothing is buffered beyond one PDU), a wrong digest, an opcode a target never
receives.  The connection core decides what a ``PduError`` costs (at error recovery
level 0: the connection).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import google_crc32c

from .constants import (
    BHS_LENGTH,
    DIGEST_LENGTH,
    FINAL_BIT,
    IMMEDIATE_BIT,
    INITIATOR_OPCODES,
    OPCODE_MASK,
    Opcode,
)

Buffer = bytes | bytearray | memoryview
MAX_AHS_BYTES = 255 * 4  # TotalAHSLength is one byte of 4-byte words

_U32 = struct.Struct(">I")
_DIGEST = struct.Struct("<I")  # RFC 7143 13.1: the digest is sent least significant byte first


def crc32c(data: Buffer) -> int:
    """CRC32C of ``data`` (google-crc32c wants read-only bytes)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    return int(google_crc32c.value(data))


def digest_bytes(data: Buffer) -> bytes:
    return _DIGEST.pack(crc32c(data))


def pad_length(n: int) -> int:
    return -n & 3


class PduError(Exception):
    """A PDU that cannot be accepted; ``digest`` marks a digest failure."""

    def __init__(self, reason: str, *, header: bytes | None = None, digest: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.header = header
        self.digest = digest


@dataclass(slots=True)
class Pdu:
    """One PDU: its BHS (48 bytes), AHS bytes, and data segment (without padding).
    ``in_place``: the data segment was received straight into the buffer the reader's
    ``sink`` named for it (``data`` is that view; nothing to copy)."""

    bhs: bytes
    ahs: bytes = b""
    data: Buffer = b""
    in_place: bool = False

    @property
    def opcode(self) -> int:
        return self.bhs[0] & OPCODE_MASK

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & IMMEDIATE_BIT)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & FINAL_BIT)

    @property
    def lun(self) -> int:
        """The 8-byte LUN field as one integer (bytes 8..15)."""
        return int.from_bytes(self.bhs[8:16], "big")

    @property
    def itt(self) -> int:
        return self.u32(16)

    def u32(self, offset: int) -> int:
        return int(_U32.unpack_from(self.bhs, offset)[0])

    def u16(self, offset: int) -> int:
        return int.from_bytes(self.bhs[offset : offset + 2], "big")


def data_segment_length(bhs: Buffer) -> int:
    return int.from_bytes(bhs[5:8], "big")


# A data segment at least this long that has not all arrived with its header is received
# straight into the buffer the sink names for it (when it names one).
SINK_MIN = 32 * 1024
RECEIVE_CHUNK = 256 * 1024  # what one get_buffer offers when no sink is filling


class PduReader:
    """Frames PDUs from received bytes.

    Two ways in: ``feed(data)``, or ``get_buffer``/``buffer_updated`` (asyncio's
    BufferedProtocol: the event loop receives into the buffer this returns), then
    ``next_pdu()`` until it returns None.  The digest switches and the data segment limit
    are attributes the core sets when login negotiates them ("digests are used starting
    with the first PDU after the Login Response with T=1 that ends the operational stage").

    ``sink(bhs)``, when set, may name where a long data segment goes: a writable view of
    exactly DataSegmentLength bytes (a write's own buffer at the Data-Out's offset), asked
    once the header is in (and its digest checked) while the data is still arriving.  The
    bytes then land there -- received into it directly when the caller uses get_buffer --
    and the PDU comes out with ``in_place`` set, its data that view: a 256 KiB Data-Out is
    not copied from a receive buffer into a segment and from the segment into the write's
    buffer.  A receive into the chunk that begins with such a header hands what came of its
    data to the sink at once (``_claim``: not through the buffer), and after a PDU that went
    to a sink the next ``get_buffer`` offers just a header's room, so that in a stream of
    large writes each data segment is received into its sink, never into the chunk.  What
    the reader holds besides is at most one PDU's header and data segment (``buffered``),
    bounded by ``max_data_segment``."""

    def __init__(self, max_data_segment: int = 8192) -> None:
        self._buf = bytearray()
        self.header_digest = False
        self.data_digest = False
        self.max_data_segment = max_data_segment
        self.sink: Callable[[bytes], memoryview | None] | None = None
        self._chunk = bytearray(RECEIVE_CHUNK)
        self._chunk_view = memoryview(self._chunk)
        # A PDU whose data segment goes to a sink: its BHS, AHS, the view, how much of it has
        # arrived, and the padding and data digest bytes still to come after it.
        self._held: tuple[bytes, bytes, memoryview, int] | None = None
        self._sink_filled = 0
        self._into_sink = False  # the last get_buffer handed out the sink
        self._header_next = False  # the last PDU went to a sink: offer the next one's header alone
        self.in_place_bytes = 0  # data received into sinks (for tests and figures)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        held = self._held
        if held is not None and self._sink_filled < len(held[2]):
            self._into_sink = True
            return held[2][self._sink_filled :]
        self._into_sink = False
        if self._header_next and not self._buf:
            # The last PDU's data went to a sink: the next is likely long too (a stream of
            # large writes), so receive its header alone, and then its data straight into the
            # sink, rather than most of its data into the chunk and from there (a copy of
            # each 256 KiB Data-Out) -- as many receives, one copy fewer.
            return self._chunk_view[: BHS_LENGTH + (DIGEST_LENGTH if self.header_digest else 0)]
        return self._chunk_view

    def buffer_updated(self, nbytes: int) -> None:
        if self._into_sink:
            self._sink_filled += nbytes
            return
        received = self._chunk_view[:nbytes]
        if not self._buf and self._held is None and nbytes > SINK_MIN and self.sink is not None:
            # A receive that starts with a header: most of a long data segment may have come
            # with it (a 256 KiB Data-Out over loopback: all but a few bytes).  Copy it from the
            # chunk straight to the sink, not through the buffer (one copy, not two).
            received = received[self._claim(received) :]
        self._buf += received

    def _claim(self, view: memoryview) -> int:
        """``view`` begins with a PDU (nothing buffered before it): when it holds the whole
        header of a long PDU whose data has not all arrived and the sink names a place for
        that data, hold the PDU, copy what arrived of the data there, and return how many
        bytes of ``view`` that consumed (its header and data); otherwise 0 (next_pdu judges
        the bytes, errors included)."""
        if len(view) < BHS_LENGTH:
            return 0
        bhs = bytes(view[:BHS_LENGTH])
        dsl = data_segment_length(bhs)
        if bhs[0] & OPCODE_MASK not in INITIATOR_OPCODES or dsl > self.max_data_segment or dsl < SINK_MIN:
            return 0
        header_end = BHS_LENGTH + bhs[4] * 4
        hd = DIGEST_LENGTH if self.header_digest else 0
        data_start = header_end + hd
        padded = dsl + pad_length(dsl)
        dd = DIGEST_LENGTH if self.data_digest else 0
        if len(view) < data_start or len(view) >= data_start + padded + dd:
            return 0
        if hd:
            got = int(_DIGEST.unpack_from(view, header_end)[0])
            if got != crc32c(view[:header_end]):
                return 0  # next_pdu raises the mismatch
        assert self.sink is not None
        target = self.sink(bhs)
        if target is None:
            return 0
        assert len(target) == dsl, (len(target), dsl)
        take = min(len(view) - data_start, dsl)
        target[:take] = view[data_start : data_start + take]
        self._held = (bhs, bytes(view[BHS_LENGTH:header_end]), target, padded - dsl + dd)
        self._sink_filled = take
        return data_start + take

    def feed(self, data: Buffer) -> None:
        """Received bytes, copied in (the get_buffer way receives them in place)."""
        held = self._held
        if held is not None and self._sink_filled < len(held[2]):
            view = memoryview(data).cast("B")
            n = min(len(held[2]) - self._sink_filled, len(view))
            held[2][self._sink_filled : self._sink_filled + n] = view[:n]
            self._sink_filled += n
            data = view[n:]
        if data:
            self._buf += data

    def next_pdu(self) -> Pdu | None:
        if self._held is not None:
            return self._finish_held()
        buf = self._buf
        if len(buf) < BHS_LENGTH:
            return None
        bhs = bytes(buf[:BHS_LENGTH])
        opcode = bhs[0] & OPCODE_MASK
        if opcode not in INITIATOR_OPCODES:
            raise PduError(f"opcode 0x{opcode:02x} is not one an initiator sends", header=bhs)
        ahs_length = bhs[4] * 4
        dsl = data_segment_length(bhs)
        if dsl > self.max_data_segment:
            raise PduError(
                f"data segment of {dsl} bytes is longer than MaxRecvDataSegmentLength {self.max_data_segment}",
                header=bhs,
            )
        header_end = BHS_LENGTH + ahs_length
        hd = DIGEST_LENGTH if self.header_digest else 0
        data_start = header_end + hd
        padded = dsl + pad_length(dsl)
        dd = DIGEST_LENGTH if self.data_digest and dsl else 0
        total = data_start + padded + dd
        if len(buf) < total:
            if dsl >= SINK_MIN and self.sink is not None and len(buf) >= data_start:
                self._check_header_digest(bhs, header_end, hd)
                target = self.sink(bhs)
                if target is not None:
                    assert len(target) == dsl, (len(target), dsl)
                    have = len(buf) - data_start
                    assert have < dsl + pad_length(dsl) + dd
                    take = min(have, dsl)
                    with memoryview(buf) as view:
                        target[:take] = view[data_start : data_start + take]
                    ahs = bytes(buf[BHS_LENGTH:header_end])
                    del buf[: data_start + take]
                    self._held = (bhs, ahs, target, padded - dsl + dd)
                    self._sink_filled = take
                    return self._finish_held()
            return None
        self._check_header_digest(bhs, header_end, hd)
        data: Buffer = b""
        if dsl:
            if dd:
                got = int(_DIGEST.unpack_from(buf, data_start + padded)[0])
                # "the data digest covers the data segment including padding"
                if got != crc32c(bytes(buf[data_start : data_start + padded])):
                    # The header was fine: the PDU is consumed and the core may reject it.
                    ahs = bytes(buf[BHS_LENGTH:header_end])
                    del buf[:total]
                    raise PduError("data digest mismatch", header=bhs + ahs, digest=True)
            # One copy (a bytearray slice, then bytes(), would be two); the view is released
            # before the buffer shrinks.
            with memoryview(buf) as view:
                data = bytes(view[data_start : data_start + dsl])
        ahs = bytes(buf[BHS_LENGTH:header_end])
        del buf[:total]
        self._header_next = False
        return Pdu(bhs, ahs, data)

    def _check_header_digest(self, bhs: bytes, header_end: int, hd: int) -> None:
        if hd:
            got = int(_DIGEST.unpack_from(self._buf, header_end)[0])
            if got != crc32c(bytes(self._buf[:header_end])):
                raise PduError("header digest mismatch", header=bhs, digest=True)

    def _finish_held(self) -> Pdu | None:
        """The PDU whose data went to the sink, once its data, padding and digest are in."""
        assert self._held is not None
        bhs, ahs, target, tail = self._held
        if self._sink_filled < len(target) or len(self._buf) < tail:
            return None
        buf = self._buf
        self._held = None
        self._sink_filled = 0
        if self.data_digest:
            pad = tail - DIGEST_LENGTH
            got = int(_DIGEST.unpack_from(buf, pad)[0])
            if got != crc32c(bytes(target) + bytes(buf[:pad])):
                del buf[:tail]
                raise PduError("data digest mismatch", header=bhs + ahs, digest=True)
        del buf[:tail]
        self.in_place_bytes += len(target)
        self._header_next = True
        return Pdu(bhs, ahs, target, in_place=True)


def build_bhs(
    opcode: Opcode,
    flags: int = FINAL_BIT,
    *,
    byte2: int = 0,
    byte3: int = 0,
    data_length: int = 0,
    lun: int = 0,
    itt: int = 0,
    fields: tuple[int, ...] = (),
    immediate: bool = False,
) -> bytearray:
    """A BHS: bytes 0..19 from the arguments, then ``fields`` as big-endian 32-bit words
    from byte 20 (at most seven)."""
    assert len(fields) <= 7
    words = [value & 0xFFFFFFFF for value in fields]
    words += [0] * (7 - len(words))
    return bytearray(
        _BHS.pack(
            int(opcode) | (IMMEDIATE_BIT if immediate else 0),
            flags,
            byte2,
            byte3,
            data_length & 0xFFFFFF,
            lun,
            itt & 0xFFFFFFFF,
            *words,
        )
    )


# The whole BHS in one pack: opcode, flags, bytes 2 and 3, TotalAHSLength (0) with
# DataSegmentLength, LUN, ITT, and the seven words from byte 20.
_BHS = struct.Struct(">BBBBIQI7I")


def pack_bhs(
    opcode: int,
    flags: int,
    byte3: int,
    data_length: int,
    lun: int,
    itt: int,
    w20: int,
    w24: int,
    w28: int,
    w32: int,
    w36: int,
    w40: int,
    w44: int,
) -> bytes:
    """``build_bhs`` for the data path (Data-In, SCSI Response, R2T): positional, no AHS,
    byte 2 zero, every value already in range (struct refuses one that is not)."""
    return _BHS.pack(opcode, flags, 0, byte3, data_length, lun, itt, w20, w24, w28, w32, w36, w40, w44)


def encode(
    bhs: bytearray, data: Buffer = b"", *, header_digest: bool = False, data_digest: bool = False
) -> list[Buffer]:
    """The wire form of a PDU, as buffers to write in order (the data is not copied)."""
    n = len(data)
    assert n < 1 << 24
    bhs[5:8] = n.to_bytes(3, "big")
    out: list[Buffer] = [bytes(bhs)]
    if header_digest:
        out.append(digest_bytes(bhs))
    if n:
        out.append(data)
        pad = pad_length(n)
        if pad:
            out.append(bytes(pad))
        if data_digest:
            out.append(digest_bytes(bytes(data) + bytes(pad)))
    return out


def parse_text(data: Buffer) -> list[tuple[str, str]]:
    """``key=value`` pairs of a Login or Text data segment (RFC 7143 6.1: UTF-8, each pair
    ends with a NUL)."""
    pairs: list[tuple[str, str]] = []
    raw = bytes(data)
    if not raw:
        return pairs
    if not raw.endswith(b"\0"):
        raise ValueError("text data does not end with a NUL")
    for item in raw[:-1].split(b"\0"):
        if not item:
            continue  # tolerate NUL padding
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise ValueError(f"not a key=value pair: {item[:64]!r}")
        if len(key) > 63:
            raise ValueError("key longer than 63 bytes")
        pairs.append((key.decode("utf-8"), value.decode("utf-8")))
    return pairs


def format_text(pairs: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)
