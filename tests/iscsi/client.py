"""A raw asyncio iSCSI initiator for tests that must see SCSI status and sense data exactly
(qemu and libiscsi retry UNIT ATTENTION and turn sense into errno): login without
authentication, then one SCSI command at a time with immediate data.  ``add_connection``
logs in another connection to the same session (MC/S: no libiscsi tool opens several); the
connections of a session share one CmdSN counter."""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

from thinblock.iscsi.constants import BHS_LENGTH, Opcode
from thinblock.iscsi.pdu import crc32c, pad_length

from .initiator import ISID, Reply, login_request, logout_request, nop_out, scsi_command


@dataclass
class SessionCounters:
    """What the connections of one session share on the initiator side."""

    cmdsn: int = 1
    itt: int = 100
    tsih: int = 0
    pairs: list[tuple[str, str]] = field(default_factory=list)

    def next_cmdsn(self) -> int:
        self.cmdsn += 1
        return self.cmdsn - 1

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt


class LoginRefused(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"login refused: status 0x{status:04x}")
        self.status = status


@dataclass
class Outcome:
    status: int
    data: bytes
    sense_key: int | None
    asc: int | None  # ASC << 8 | ASCQ


class RawInitiator:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        port: int = 0,
        isid: int = ISID,
        cid: int = 0,
        session: SessionCounters | None = None,
    ) -> None:
        self.reader, self.writer = reader, writer
        self.port, self.isid, self.cid = port, isid, cid
        self.session = session or SessionCounters()
        # CRC32C digests, as the login negotiated them (``digests=True`` offers them).
        self.header_digest = False
        self.data_digest = False

    @classmethod
    async def connect(
        cls,
        port: int,
        target: str,
        initiator: str,
        isid: int = ISID,
        *,
        max_connections: int = 1,
        cid: int = 0,
        session: SessionCounters | None = None,
        digests: bool = False,
    ) -> RawInitiator:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self = cls(reader, writer, port=port, isid=isid, cid=cid, session=session)
        counters = self.session
        if not counters.pairs:
            counters.pairs = [
                ("InitiatorName", initiator),
                ("SessionType", "Normal"),
                ("TargetName", target),
                ("ImmediateData", "Yes"),
                ("InitialR2T", "No"),
                ("FirstBurstLength", "262144"),
                ("MaxBurstLength", "1048576"),
                ("MaxRecvDataSegmentLength", "262144"),
                ("MaxConnections", str(max_connections)),
            ]
            if digests:
                counters.pairs += [("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C")]
        writer.write(
            login_request(
                counters.pairs, csg=1, nsg=3, isid=isid, tsih=counters.tsih, cid=cid, cmdsn=counters.cmdsn
            )
        )
        reply = await self._reply()
        self.login_reply = reply
        if reply.login_status != 0:
            writer.close()
            raise LoginRefused(reply.login_status)
        assert reply.opcode == Opcode.LOGIN_RESPONSE
        counters.tsih = int.from_bytes(reply.bhs[14:16], "big")
        keys = reply.text
        self.header_digest = keys.get("HeaderDigest") == "CRC32C"
        self.data_digest = keys.get("DataDigest") == "CRC32C"
        return self

    async def add_connection(self, cid: int) -> RawInitiator:
        """Another connection of this session (a Login with its TSIH and a new CID)."""
        return await RawInitiator.connect(self.port, "", "", self.isid, cid=cid, session=self.session)

    async def logout(self, *, reason: int = 0, cid: int | None = None) -> int:
        """Logout (reason 0: the session, 1: connection ``cid``); the response code."""
        request = logout_request(
            itt=self.session.next_itt(),
            cmdsn=self.session.cmdsn,
            reason=reason,
            cid=self.cid if cid is None else cid,
        )
        self.writer.write(request)
        while True:
            reply = await self._reply()
            if reply.opcode == Opcode.LOGOUT_RESPONSE:
                return int(reply.bhs[2])

    def send_command(self, cdb: bytes, *, cmdsn: int, itt: int, read: int = 0, data: bytes = b"") -> None:
        """Send one command without waiting (the caller numbers it)."""
        edtl = read or len(data)
        self.writer.write(
            scsi_command(
                cdb,
                itt=itt,
                cmdsn=cmdsn,
                edtl=edtl,
                read=bool(read),
                write=bool(data),
                data=data,
                header_digest=self.header_digest,
                data_digest=self.data_digest,
            )
        )

    async def answer_pings(self, until: asyncio.Event) -> int:
        """Read and answer the target's NOP-In pings until ``until`` is set; how many."""
        answered = 0
        while not until.is_set():
            try:
                reply = await asyncio.wait_for(self._reply(), 0.05)
            except TimeoutError:
                continue
            assert reply.opcode == Opcode.NOP_IN and reply.u32(16) == 0xFFFFFFFF, hex(reply.opcode)
            self.writer.write(nop_out(itt=0xFFFFFFFF, cmdsn=self.session.cmdsn, ttt=reply.u32(20)))
            answered += 1
        return answered

    async def next_pdu(self) -> Reply:
        return await self._reply()

    async def outcome(self) -> tuple[int, Outcome]:
        """The next command's answer on this connection: (ITT, outcome)."""
        got = bytearray()
        while True:
            reply = await self._reply()
            itt = reply.u32(16)
            if reply.opcode == Opcode.SCSI_DATA_IN:
                got += reply.data
                if reply.flags & 0x01:
                    return itt, Outcome(reply.bhs[3], bytes(got), None, None)
                continue
            if reply.opcode == Opcode.NOP_IN:
                continue
            assert reply.opcode == Opcode.SCSI_RESPONSE, hex(reply.opcode)
            sense = reply.data[2:] if reply.data else b""
            if sense:
                return itt, Outcome(reply.bhs[3], bytes(got), sense[2] & 0x0F, sense[12] << 8 | sense[13])
            return itt, Outcome(reply.bhs[3], bytes(got), None, None)

    async def _reply(self) -> Reply:
        bhs = await self.reader.readexactly(BHS_LENGTH)
        dsl = int.from_bytes(bhs[5:8], "big")
        ahs = await self.reader.readexactly(bhs[4] * 4)
        if self.header_digest:
            digest = await self.reader.readexactly(4)
            assert digest == struct.pack("<I", crc32c(bhs + ahs)), "bad header digest from the target"
        body = await self.reader.readexactly(dsl + pad_length(dsl))
        if self.data_digest and dsl:
            digest = await self.reader.readexactly(4)
            assert digest == struct.pack("<I", crc32c(body)), "bad data digest from the target"
        return Reply(bhs, body[:dsl])

    async def command(self, cdb: bytes, *, read: int = 0, data: bytes = b"") -> Outcome:
        itt = self.session.next_itt()
        self.send_command(cdb, cmdsn=self.session.next_cmdsn(), itt=itt, read=read, data=data)
        answered, outcome = await self.outcome()
        assert answered == itt
        return outcome

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
