"""A raw asyncio iSCSI initiator for tests that must see SCSI status and sense data exactly
(qemu and libiscsi retry UNIT ATTENTION and turn sense into errno): login without
authentication, then one SCSI command at a time with immediate data."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from thinblock.iscsi.constants import BHS_LENGTH, Opcode
from thinblock.iscsi.pdu import pad_length

from .initiator import ISID, Reply, login_request, scsi_command


@dataclass
class Outcome:
    status: int
    data: bytes
    sense_key: int | None
    asc: int | None  # ASC << 8 | ASCQ


class RawInitiator:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.cmdsn = 1
        self.itt = 100

    @classmethod
    async def connect(cls, port: int, target: str, initiator: str, isid: int = ISID) -> RawInitiator:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self = cls(reader, writer)
        pairs = [
            ("InitiatorName", initiator),
            ("SessionType", "Normal"),
            ("TargetName", target),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "No"),
            ("FirstBurstLength", "262144"),
            ("MaxBurstLength", "1048576"),
            ("MaxRecvDataSegmentLength", "262144"),
        ]
        writer.write(login_request(pairs, csg=1, nsg=3, isid=isid))
        reply = await self._reply()
        assert reply.opcode == Opcode.LOGIN_RESPONSE and reply.login_status == 0, reply.login_status
        return self

    async def _reply(self) -> Reply:
        bhs = await self.reader.readexactly(BHS_LENGTH)
        dsl = int.from_bytes(bhs[5:8], "big")
        body = await self.reader.readexactly(bhs[4] * 4 + dsl + pad_length(dsl))
        return Reply(bhs, body[bhs[4] * 4 : bhs[4] * 4 + dsl])

    async def command(self, cdb: bytes, *, read: int = 0, data: bytes = b"") -> Outcome:
        self.itt += 1
        edtl = read or len(data)
        self.writer.write(
            scsi_command(
                cdb, itt=self.itt, cmdsn=self.cmdsn, edtl=edtl, read=bool(read), write=bool(data), data=data
            )
        )
        self.cmdsn += 1
        got = bytearray()
        while True:
            reply = await self._reply()
            if reply.opcode == Opcode.SCSI_DATA_IN:
                got += reply.data
                if reply.flags & 0x01:
                    return Outcome(reply.bhs[3], bytes(got), None, None)
                continue
            assert reply.opcode == Opcode.SCSI_RESPONSE, hex(reply.opcode)
            sense = reply.data[2:] if reply.data else b""
            if sense:
                return Outcome(reply.bhs[3], bytes(got), sense[2] & 0x0F, sense[12] << 8 | sense[13])
            return Outcome(reply.bhs[3], bytes(got), None, None)

    async def write16(self, lba: int, data: bytes) -> Outcome:
        """WRITE (16) in commands of at most 256 KiB (all immediate data); the first outcome
        that is not GOOD, or the last one."""
        step = 256 * 1024
        outcome = Outcome(0, b"", None, None)
        for pos in range(0, len(data), step):
            piece = data[pos : pos + step]
            first = lba + pos // 512
            cdb = (
                bytes([0x8A, 0])
                + first.to_bytes(8, "big")
                + (len(piece) // 512).to_bytes(4, "big")
                + bytes(2)
            )
            outcome = await self.command(cdb, data=piece)
            if outcome.status != 0:
                return outcome
        return outcome

    async def read16(self, lba: int, blocks: int) -> Outcome:
        cdb = bytes([0x88, 0]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(2)
        return await self.command(cdb, read=blocks * 512)

    async def test_unit_ready(self) -> Outcome:
        return await self.command(bytes(6))

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
