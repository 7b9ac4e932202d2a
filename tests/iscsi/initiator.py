"""A minimal initiator side for driving the sans-IO target core in tests: builds Login, Text,
SCSI Command, Data-Out, NOP-Out and Logout PDUs and parses what the target sends."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from thinblock.iscsi.constants import BHS_LENGTH, Opcode
from thinblock.iscsi.pdu import build_bhs, crc32c, encode, format_text, pad_length, parse_text

ISID = 0x23D000000001


def login_request(
    pairs: list[tuple[str, str]],
    *,
    csg: int,
    nsg: int,
    transit: bool = True,
    cont: bool = False,
    itt: int = 1,
    cmdsn: int = 1,
    isid: int = ISID,
    tsih: int = 0,
    cid: int = 0,
) -> bytes:
    flags = (0x80 if transit else 0) | (0x40 if cont else 0) | (csg << 2) | (nsg if transit else 0)
    bhs = build_bhs(
        Opcode.LOGIN_REQUEST, flags, itt=itt, fields=(cid << 16, cmdsn, 0, 0, 0, 0, 0), immediate=True
    )
    bhs[8:14] = isid.to_bytes(6, "big")
    bhs[14:16] = tsih.to_bytes(2, "big")
    return b"".join(bytes(b) for b in encode(bhs, format_text(pairs)))


def text_request(
    pairs: list[tuple[str, str]], *, itt: int, cmdsn: int, ttt: int = 0xFFFFFFFF, **digests: bool
) -> bytes:
    bhs = build_bhs(Opcode.TEXT_REQUEST, 0x80, itt=itt, fields=(ttt, cmdsn, 0, 0, 0, 0, 0))
    return b"".join(bytes(b) for b in encode(bhs, format_text(pairs), **digests))


def scsi_command(
    cdb: bytes,
    *,
    itt: int,
    cmdsn: int,
    edtl: int,
    read: bool = False,
    write: bool = False,
    data: bytes = b"",
    final: bool = True,
    header_digest: bool = False,
    data_digest: bool = False,
) -> bytes:
    flags = (0x80 if final else 0) | (0x40 if read else 0) | (0x20 if write else 0) | 1
    bhs = build_bhs(Opcode.SCSI_COMMAND, flags, itt=itt, fields=(edtl, cmdsn, 0, 0, 0, 0, 0))
    bhs[32:48] = cdb.ljust(16, b"\0")
    return b"".join(bytes(b) for b in encode(bhs, data, header_digest=header_digest, data_digest=data_digest))


def data_out(
    data: bytes, *, itt: int, ttt: int, datasn: int, offset: int, final: bool, **digests: bool
) -> bytes:
    bhs = build_bhs(
        Opcode.SCSI_DATA_OUT, 0x80 if final else 0, itt=itt, fields=(ttt, 0, 0, 0, datasn, offset, 0)
    )
    return b"".join(bytes(b) for b in encode(bhs, data, **digests))


def nop_out(*, itt: int, cmdsn: int, data: bytes = b"", ttt: int = 0xFFFFFFFF, **digests: bool) -> bytes:
    """A ping (ITT given) or, with ITT 0xffffffff and the target's TTT, the answer to its ping."""
    bhs = build_bhs(Opcode.NOP_OUT, 0x80, itt=itt, fields=(ttt, cmdsn, 0, 0, 0, 0, 0), immediate=True)
    return b"".join(bytes(b) for b in encode(bhs, data, **digests))


def logout_request(*, itt: int, cmdsn: int, reason: int = 0, cid: int = 0) -> bytes:
    """Reason 0: close the session; 1: close the connection ``cid``; 2: remove it for recovery."""
    bhs = build_bhs(
        Opcode.LOGOUT_REQUEST,
        0x80 | reason,
        itt=itt,
        fields=(cid << 16, cmdsn, 0, 0, 0, 0, 0),
        immediate=True,
    )
    return bytes(bhs)


@dataclass
class Reply:
    bhs: bytes
    data: bytes

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def flags(self) -> int:
        return self.bhs[1]

    def u32(self, offset: int) -> int:
        return int(struct.unpack_from(">I", self.bhs, offset)[0])

    @property
    def login_status(self) -> int:
        return self.bhs[36] << 8 | self.bhs[37]

    @property
    def text(self) -> dict[str, str]:
        return dict(parse_text(self.data))


def parse_replies(raw: bytes, *, header_digest: bool = False, data_digest: bool = False) -> list[Reply]:
    out = []
    pos = 0
    while pos < len(raw):
        bhs = raw[pos : pos + BHS_LENGTH]
        assert len(bhs) == BHS_LENGTH, "truncated reply"
        dsl = int.from_bytes(bhs[5:8], "big")
        pos += BHS_LENGTH + bhs[4] * 4
        if header_digest:
            assert raw[pos : pos + 4] == struct.pack("<I", crc32c(bhs)), "bad header digest from the target"
            pos += 4
        padded = dsl + pad_length(dsl)
        data = raw[pos : pos + dsl]
        if data_digest and dsl:
            assert raw[pos + padded : pos + padded + 4] == struct.pack("<I", crc32c(raw[pos : pos + padded]))
            pos += 4
        pos += padded
        out.append(Reply(bhs, data))
    return out
