"""The SCSI command layer (SPC-4, SBC-3) of one logical unit: a thin VV.

It talks only to the ``Volume`` interface (thinblock.blockdev), like the NBD server:
READ/WRITE map to ``read``/``write``, UNMAP and WRITE SAME with UNMAP to ``trim``,
WRITE SAME of zeros to ``write_zeroes``, SYNCHRONIZE CACHE to ``flush``, GET LBA STATUS
to ``block_status`` (the region map: a hole is a deallocated run).  What it adds is
SCSI: CDB parsing and validation, sense data, VPD pages, mode pages, unit attentions.

Thin provisioning in band (SBC-3 4.7):

* The LU is thin (VPD B2 provisioning type 2, LBPME in READ CAPACITY 16), unmapped
  blocks read zeros (LBPRZ) since unassigned regions point at the zero LD.
* A write that needs a region the VV may not have (``OutOfSpace``: VV limit, pool
  growth limit, no chunklet) ends with DATA PROTECT, SPACE ALLOCATION FAILED WRITE
  PROTECT (27h/07h), not a medium error; writes to assigned regions go on.
* ``soft_threshold_reached()`` queues UNIT ATTENTION 38h/07h (THIN PROVISIONING SOFT
  THRESHOLD REACHED) for every I_T nexus using the LU: each gets it once per crossing.

Logical blocks are 512 bytes (what every initiator handles); the physical block
exponent says 4 KiB, and the optimal unmap granularity is the VV's region size: an
unmap smaller than a region is done by writing zeros, which frees nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from thinblock.blockdev import Buffer, ExtentFlags, FileSpan, SpanPiece, Volume
from thinblock.errors import InvalidArgument, MediumError, NotFound, OutOfSpace, ReadOnlyDevice

from .connection import ScsiResult
from .constants import (
    SA_GET_LBA_STATUS,
    SA_READ_CAPACITY_16,
    SA_REPORT_SUPPORTED_OPCODES,
    Asc,
    Op,
    SenseKey,
    Status,
)
from .sense import CheckCondition, illegal

log = logging.getLogger("thinblock.iscsi")

BLOCK_SIZE = 512
BLOCK_SHIFT = 9
PHYSICAL_BLOCK_EXPONENT = 3  # 4 KiB: what hosts should align to (page size, RAID 5 units)
MAX_TRANSFER_BLOCKS = 32 * 1024 * 1024 // BLOCK_SIZE  # VPD B0 MAXIMUM TRANSFER LENGTH
MAX_UNMAP_BLOCKS = 1024 * 1024  # per UNMAP descriptor (512 MiB; libiscsi wants at most 2^20)
MAX_UNMAP_DESCRIPTORS = 256
MAX_WRITE_SAME_BLOCKS = 1024 * 1024 * 1024 // BLOCK_SIZE
_WRITE_SAME_CHUNK = 1024 * 1024
VENDOR = b"THINBLK "
PRODUCT = b"Thin VV         "
REVISION = b"0001"
_NO_UA_CHECK = frozenset({Op.INQUIRY, Op.REPORT_LUNS, Op.REQUEST_SENSE})
_FAST_RW = frozenset({Op.READ_10, Op.READ_16, Op.WRITE_10, Op.WRITE_16})
_LBA16 = struct.Struct(">QI")  # LOGICAL BLOCK ADDRESS, TRANSFER LENGTH of a 16-byte CDB
_LBA10 = struct.Struct(">IxH")  # ... of a 10-byte CDB (GROUP NUMBER between them)

Nexus = str  # "initiator name,i,0xISID": one I_T nexus


@dataclass(slots=True)
class _Registration:
    key: int


@dataclass(slots=True)
class Reservations:
    """Persistent reservations (SPC-4 5.12): registrations per I_T nexus, one holder."""

    generation: int = 0
    keys: dict[Nexus, int] = field(default_factory=dict)
    holder: Nexus | None = None
    type: int = 0


_ALL_REGISTRANTS = (7, 8)  # WRITE EXCLUSIVE / EXCLUSIVE ACCESS - ALL REGISTRANTS
_REGISTRANTS_ONLY = (5, 6)
_WRITE_EXCLUSIVE = (1, 5, 7)
_VALID_TYPES = (1, 3, 5, 6, 7, 8)
# Commands a reservation conflict never refuses (SPC-4 table 47, the common subset).
_ALLOWED_UNDER_RESERVATION = frozenset(
    {
        Op.INQUIRY,
        Op.REPORT_LUNS,
        Op.REQUEST_SENSE,
        Op.TEST_UNIT_READY,
        Op.READ_CAPACITY_10,
        Op.PERSISTENT_RESERVE_IN,
        Op.PERSISTENT_RESERVE_OUT,
        Op.SERVICE_ACTION_IN_16,
        Op.MAINTENANCE_IN,
    }
)
_READS = frozenset({Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16, Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16})


def _u16(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 2], "big")


def _u32(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 4], "big")


def _u64(b: bytes, i: int) -> int:
    return int.from_bytes(b[i : i + 8], "big")


# CDB lengths by group code (SPC-4 4.2.5.1).
def cdb_length(opcode: int) -> int:
    group = opcode >> 5
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(group, 16)


# Usage bitmaps for REPORT SUPPORTED OPERATION CODES (one_command): which CDB bits the
# device server looks at.  (opcode, service action or None) -> bitmap.
_USAGE: dict[tuple[int, int | None], bytes] = {
    (Op.TEST_UNIT_READY, None): bytes([0x00, 0, 0, 0, 0, 0x07]),
    (Op.REQUEST_SENSE, None): bytes([0x03, 0x01, 0, 0, 0xFF, 0x07]),
    (Op.READ_6, None): bytes([0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),
    (Op.WRITE_6, None): bytes([0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),
    (Op.INQUIRY, None): bytes([0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07]),
    (Op.MODE_SELECT_6, None): bytes([0x15, 0x11, 0, 0, 0xFF, 0x07]),
    (Op.MODE_SENSE_6, None): bytes([0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x07]),
    (Op.START_STOP_UNIT, None): bytes([0x1B, 0x01, 0, 0x0F, 0xF7, 0x07]),
    (Op.PREVENT_ALLOW_MEDIUM_REMOVAL, None): bytes([0x1E, 0, 0, 0, 0x03, 0x07]),
    (Op.READ_CAPACITY_10, None): bytes([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0x07]),
    (Op.READ_10, None): bytes([0x28, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (Op.WRITE_10, None): bytes([0x2A, 0x18, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (Op.WRITE_AND_VERIFY_10, None): bytes([0x2E, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (Op.WRITE_AND_VERIFY_12, None): bytes([0xAE, 0x02] + [0xFF] * 8 + [0x1F, 0x07]),
    (Op.WRITE_AND_VERIFY_16, None): bytes([0x8E, 0x02] + [0xFF] * 12 + [0x1F, 0x07]),
    (Op.VERIFY_10, None): bytes([0x2F, 0x16, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (Op.SYNCHRONIZE_CACHE_10, None): bytes([0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (Op.WRITE_SAME_10, None): bytes([0x41, 0x08, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (Op.UNMAP, None): bytes([0x42, 0, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0x07]),
    (Op.MODE_SELECT_10, None): bytes([0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (Op.MODE_SENSE_10, None): bytes([0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (Op.READ_16, None): bytes([0x88, 0x18] + [0xFF] * 12 + [0x1F, 0x07]),
    (Op.WRITE_16, None): bytes([0x8A, 0x18] + [0xFF] * 12 + [0x1F, 0x07]),
    (Op.VERIFY_16, None): bytes([0x8F, 0x16] + [0xFF] * 12 + [0x1F, 0x07]),
    (Op.SYNCHRONIZE_CACHE_16, None): bytes([0x91, 0x02] + [0xFF] * 12 + [0x1F, 0x07]),
    (Op.WRITE_SAME_16, None): bytes([0x93, 0x09] + [0xFF] * 12 + [0x1F, 0x07]),
    (Op.SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16): bytes([0x9E, 0x10] + [0] * 8 + [0xFF] * 4 + [0, 0x07]),
    (Op.SERVICE_ACTION_IN_16, SA_GET_LBA_STATUS): bytes([0x9E, 0x12] + [0xFF] * 8 + [0xFF] * 4 + [0, 0x07]),
    (Op.REPORT_LUNS, None): bytes([0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07]),
    (Op.MAINTENANCE_IN, SA_REPORT_SUPPORTED_OPCODES): bytes(
        [0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07]
    ),
    (Op.READ_12, None): bytes([0xA8, 0x18] + [0xFF] * 8 + [0x1F, 0x07]),
    (Op.WRITE_12, None): bytes([0xAA, 0x18] + [0xFF] * 8 + [0x1F, 0x07]),
    (Op.VERIFY_12, None): bytes([0xAF, 0x16] + [0xFF] * 8 + [0x1F, 0x07]),
    (Op.PERSISTENT_RESERVE_IN, None): bytes([0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (Op.PERSISTENT_RESERVE_OUT, None): bytes([0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07]),
}
_SERVICE_ACTION_OPS = frozenset({Op.SERVICE_ACTION_IN_16, Op.MAINTENANCE_IN})


def designator(
    code_set: int, association_type: int, data: bytes, *, piv_protocol: int | None = None
) -> bytes:
    """An identification descriptor of VPD page 83h."""
    byte0 = code_set
    byte1 = association_type
    if piv_protocol is not None:
        byte0 |= piv_protocol << 4
        byte1 |= 0x80  # PIV
    return bytes([byte0, byte1, 0, len(data)]) + data


class LogicalUnit:
    """One VV as a SCSI direct-access block device (LUN 0 of its target)."""

    def __init__(self, volume: Volume, *, target_name: str) -> None:
        self.volume = volume
        self.target_name = target_name
        digest = hashlib.sha256(f"thinblock:{volume.name}".encode()).digest()
        self.serial = digest[:8].hex()
        # NAA 3 ("locally assigned"): 60 bits from the VV's name.
        self.naa = bytes([0x30 | (digest[8] & 0x0F)]) + digest[9:16]
        self.pending_ua: dict[Nexus, list[int]] = {}
        self.nexuses: set[Nexus] = set()
        self.sense: dict[Nexus, bytes] = {}
        self.reservations = Reservations()
        self.gone = False  # the VV was deleted
        self._size = volume.size
        # Read once: the volume's largest single request, and the object that says whether
        # the VV was deleted (under a metrics wrapper, the VV itself: asking the wrapper for
        # an attribute it lacks costs a failed lookup per command).
        self._max_block = volume.capabilities.maximum_block
        # The volume has read_spans (the zero-copy read path NBD uses too): beyond the Volume
        # protocol, as on the NBD server, so bound once.
        self._read_spans: Callable[[int, int], Awaitable[list[SpanPiece]]] | None = getattr(
            volume, "read_spans", None
        )
        self._file_spans = volume.capabilities.file_spans and self._read_spans is not None
        self._base = getattr(volume, "_inner", volume)

    # --- who is connected -------------------------------------------------------------------
    def attach(self, nexus: Nexus) -> None:
        self.nexuses.add(nexus)

    def detach(self, nexus: Nexus) -> None:
        self.nexuses.discard(nexus)
        self.pending_ua.pop(nexus, None)
        self.sense.pop(nexus, None)

    def unit_attention(self, asc: int, nexuses: Iterable[Nexus] | None = None) -> None:
        """Queue a UNIT ATTENTION for the given nexuses (default: every one attached)."""
        for nexus in self.nexuses if nexuses is None else nexuses:
            queue = self.pending_ua.setdefault(nexus, [])
            if asc not in queue:
                queue.append(asc)

    def soft_threshold_reached(self) -> None:
        """The VV crossed its allocation warning (SBC-3 4.7.3.6.2)."""
        self.unit_attention(Asc.THIN_PROVISIONING_SOFT_THRESHOLD_REACHED)

    # --- geometry -----------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return self.volume.size >> BLOCK_SHIFT

    @property
    def region_blocks(self) -> int:
        region = getattr(self.volume, "region_size", 1024 * 1024)
        return max(1, int(region) >> BLOCK_SHIFT)

    def _check_range(self, lba: int, count: int) -> None:
        if lba + count > self.blocks or lba >= (1 << 64):
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)

    # --- entry --------------------------------------------------------------------------------
    async def execute(
        self, nexus: Nexus, cdb: bytes, data: bytearray | None, *, spans: bool = False
    ) -> ScsiResult:
        """Run one command.  ``spans``: the caller can send a read's data from files
        (sendfile): a READ whose data lies in files as it is (``read_spans``: one region, no
        write-back data over it) is then answered with ``ScsiResult.spans``."""
        op = cdb[0]
        try:
            if (
                op in _FAST_RW
                and self.reservations.holder is None
                and not self.gone
                and not self.pending_ua.get(nexus)
            ):
                result = await self._fast_rw(op, cdb, data, spans and self._file_spans)
                if result is not None:
                    if self.sense:
                        self.sense.pop(nexus, None)
                    return result
            if self.gone or getattr(self._base, "deleted", False):
                self.gone = True
                if op in (Op.INQUIRY, Op.REPORT_LUNS):
                    pass
                else:
                    raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED)
            size = self.volume.size
            if size != self._size:
                self._size = size
                self.unit_attention(Asc.CAPACITY_DATA_CHANGED)
            if op not in _NO_UA_CHECK:
                queue = self.pending_ua.get(nexus)
                if queue:
                    asc = queue.pop(0)
                    raise CheckCondition(SenseKey.UNIT_ATTENTION, asc)
            if len(cdb) < cdb_length(op):
                raise illegal()
            self._check_reservation(nexus, op, cdb)
            result = await self._execute(nexus, op, cdb, data)
            if op != Op.REQUEST_SENSE:
                self.sense.pop(nexus, None)
            return result
        except _ReservationConflict:
            return ScsiResult(Status.RESERVATION_CONFLICT, wanted=0)
        except CheckCondition as cc:
            return self._fail(nexus, cc)
        except OutOfSpace as exc:
            log.debug("LU %s: write refused: %s", self.volume.name, exc)
            return self._fail(
                nexus, CheckCondition(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
            )
        except ReadOnlyDevice:
            # A snapshot (read-only, WP set in MODE SENSE): SBC-3 4.11, DATA PROTECT / WRITE PROTECTED.
            return self._fail(nexus, CheckCondition(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED))
        except MediumError as exc:
            log.warning("LU %s: medium error: %s", self.volume.name, exc)
            asc = Asc.UNRECOVERED_READ_ERROR if op in _READS else Asc.WRITE_ERROR
            return self._fail(nexus, CheckCondition(SenseKey.MEDIUM_ERROR, asc))
        except NotFound:
            self.gone = True
            return self._fail(nexus, CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LOGICAL_UNIT_NOT_SUPPORTED))
        except InvalidArgument as exc:
            log.warning("LU %s: invalid request: %s", self.volume.name, exc)
            return self._fail(nexus, illegal())
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("LU %s: 0x%02x failed unexpectedly: %r", self.volume.name, op, exc)
            return self._fail(nexus, CheckCondition(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE))

    async def _fast_rw(
        self, op: int, cdb: bytes, data: bytearray | None, spans: bool = False
    ) -> ScsiResult | None:
        """READ/WRITE 10/16 as hosts send them (no protection bits, within the volume and one
        volume request, the whole write's data here), with nothing pending for the nexus:
        the same checks as the general path in fewer steps; None for anything else, which
        the general path then answers (sense data, UNIT ATTENTION, splitting, residuals)."""
        volume = self.volume
        size = volume.size
        if size != self._size or getattr(self._base, "deleted", False):
            return None
        if op >= 0x88:  # READ (16), WRITE (16)
            if len(cdb) < 16:
                return None
            lba, count = _LBA16.unpack_from(cdb, 2)
        else:
            lba, count = _LBA10.unpack_from(cdb, 2)
        length = count << BLOCK_SHIFT
        if cdb[1] & 0xE0 or not count or length > self._max_block or (lba << BLOCK_SHIFT) + length > size:
            return None
        offset = lba << BLOCK_SHIFT
        if op == Op.READ_10 or op == Op.READ_16:
            if spans:
                assert self._read_spans is not None  # (_file_spans)
                return _spans_result(await self._read_spans(offset, length), length)
            return ScsiResult(data=await volume.read(offset, length))
        if data is None or len(data) != length:
            return None
        await volume.write(offset, data, fua=bool(cdb[1] & 0x08))
        return ScsiResult(wanted=length)

    def _fail(self, nexus: Nexus, cc: CheckCondition) -> ScsiResult:
        self.sense[nexus] = cc.sense  # REQUEST SENSE returns it until the next command
        return ScsiResult(Status.CHECK_CONDITION, sense=cc.sense, wanted=cc.wanted)

    async def _execute(self, nexus: Nexus, op: int, cdb: bytes, data: bytearray | None) -> ScsiResult:
        if op in (Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16):
            return await self._read(op, cdb)
        if op in (Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16):
            return await self._write(op, cdb, data)
        if op in (Op.WRITE_AND_VERIFY_10, Op.WRITE_AND_VERIFY_12, Op.WRITE_AND_VERIFY_16):
            # The write is acknowledged only once it reached the LD (write-through) or the
            # node's cache; verifying means reading back what was just written, which adds
            # nothing here.  BYTCHK=0 (the only form WRITE AND VERIFY has in SBC-3 besides 1,
            # which compares with itself) is the same write.
            return await self._write(op, cdb, data)
        if op == Op.TEST_UNIT_READY:
            return ScsiResult()
        if op == Op.INQUIRY:
            return self._inquiry(cdb)
        if op == Op.READ_CAPACITY_10:
            return self._read_capacity_10(cdb)
        if op == Op.SERVICE_ACTION_IN_16:
            sa = cdb[1] & 0x1F
            if sa == SA_READ_CAPACITY_16:
                return self._read_capacity_16(cdb)
            if sa == SA_GET_LBA_STATUS:
                return await self._get_lba_status(cdb)
            raise illegal(field=1)
        if op == Op.REPORT_LUNS:
            return self._report_luns(cdb)
        if op == Op.REQUEST_SENSE:
            return self._request_sense(nexus, cdb)
        if op in (Op.SYNCHRONIZE_CACHE_10, Op.SYNCHRONIZE_CACHE_16):
            if op == Op.SYNCHRONIZE_CACHE_10:
                lba, count = _u32(cdb, 2), _u16(cdb, 7)
            else:
                lba, count = _u64(cdb, 2), _u32(cdb, 10)
            self._check_range(lba, count)
            await self.volume.flush()
            return ScsiResult()
        if op in (Op.WRITE_SAME_10, Op.WRITE_SAME_16):
            return await self._write_same(op, cdb, data)
        if op == Op.UNMAP:
            return await self._unmap(cdb, data)
        if op in (Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16):
            return await self._verify(op, cdb, data)
        if op in (Op.MODE_SENSE_6, Op.MODE_SENSE_10):
            return self._mode_sense(op, cdb)
        if op in (Op.MODE_SELECT_6, Op.MODE_SELECT_10):
            return self._mode_select(op, cdb, data)
        if op == Op.MAINTENANCE_IN and (cdb[1] & 0x1F) == SA_REPORT_SUPPORTED_OPCODES:
            return self._report_supported_opcodes(cdb)
        if op == Op.PERSISTENT_RESERVE_IN:
            return self._persistent_reserve_in(nexus, cdb)
        if op == Op.PERSISTENT_RESERVE_OUT:
            return self._persistent_reserve_out(nexus, cdb, data)
        if op in (Op.START_STOP_UNIT, Op.PREVENT_ALLOW_MEDIUM_REMOVAL):
            return ScsiResult()
        raise illegal(Asc.INVALID_COMMAND_OPERATION_CODE, field=0)

    # --- I/O -----------------------------------------------------------------------------------
    @staticmethod
    def _rw_fields(op: int, cdb: bytes) -> tuple[int, int, int]:
        """(lba, blocks, byte 1 flags) of a READ/WRITE/VERIFY CDB."""
        if op in (Op.READ_6, Op.WRITE_6):
            lba = ((cdb[1] & 0x1F) << 16) | _u16(cdb, 2)
            count = cdb[4] or 256  # SBC-3: 0 means 256 blocks
            return lba, count, 0
        if op in (Op.READ_10, Op.WRITE_10, Op.VERIFY_10, Op.WRITE_AND_VERIFY_10):
            return _u32(cdb, 2), _u16(cdb, 7), cdb[1]
        if op in (Op.READ_12, Op.WRITE_12, Op.VERIFY_12, Op.WRITE_AND_VERIFY_12):
            return _u32(cdb, 2), _u32(cdb, 6), cdb[1]
        return _u64(cdb, 2), _u32(cdb, 10), cdb[1]

    def _check_io(self, op: int, cdb: bytes) -> tuple[int, int, bool]:
        lba, count, flags = self._rw_fields(op, cdb)
        if flags & 0xE0:
            # RDPROTECT/WRPROTECT/VRPROTECT: the LU has no protection information.
            raise illegal(field=1)
        self._check_range(lba, count)
        if count > MAX_TRANSFER_BLOCKS:
            raise illegal(field=7)
        return lba, count, bool(flags & 0x08)

    async def _read(self, op: int, cdb: bytes) -> ScsiResult:
        lba, count, _fua = self._check_io(op, cdb)
        if not count:
            return ScsiResult()
        length = count << BLOCK_SHIFT
        data = await self._read_bytes(lba << BLOCK_SHIFT, length)
        return ScsiResult(data=data)

    async def _read_bytes(self, offset: int, length: int) -> Buffer:
        step = self.volume.capabilities.maximum_block
        if length <= step:
            return await self.volume.read(offset, length)
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            n = min(step, end - pos)
            out += await self.volume.read(pos, n)
            pos += n
        return out

    async def _write(self, op: int, cdb: bytes, data: bytearray | None) -> ScsiResult:
        lba, count, fua = self._check_io(op, cdb)
        length = count << BLOCK_SHIFT
        if not count:
            return ScsiResult(wanted=0)
        wanted = length
        if data is None or len(data) < length:
            # The initiator sent less than the CDB asks for (Expected Data Transfer Length
            # below the transfer length).  FCP-4 9.4.2 a), as libiscsi's residual tests
            # expect: "process the command normally except that data beyond [EDTL] shall
            # not be ... transferred": the whole blocks received are written, GOOD, and
            # the residual overflow says how much was not.
            length = (len(data) if data is not None else 0) >> BLOCK_SHIFT << BLOCK_SHIFT
            if not length:
                return ScsiResult(wanted=wanted)
        assert data is not None
        view = memoryview(data)[:length]
        step = self.volume.capabilities.maximum_block
        offset = lba << BLOCK_SHIFT
        for start in range(0, length, step):
            await self.volume.write(offset + start, view[start : start + step], fua=fua)
        return ScsiResult(wanted=wanted)

    async def _verify(self, op: int, cdb: bytes, data: bytearray | None) -> ScsiResult:
        lba, count, flags = self._rw_fields(op, cdb)
        if flags & 0xE0:
            raise illegal(field=1)
        bytchk = (flags >> 1) & 3
        self._check_range(lba, count)
        if bytchk == 0 or not count:
            return ScsiResult(wanted=0)
        if bytchk not in (1, 3):
            raise illegal(field=1)
        length = count << BLOCK_SHIFT if bytchk == 1 else BLOCK_SIZE
        if data is None or len(data) < length:
            raise illegal(field=1)
        current = await self._read_bytes(lba << BLOCK_SHIFT, count << BLOCK_SHIFT)
        expected = bytes(data[:length]) if bytchk == 1 else bytes(data[:BLOCK_SIZE]) * count
        if bytes(current) != expected:
            mismatch = next(
                i for i, (a, b) in enumerate(zip(bytes(current), expected, strict=True)) if a != b
            )
            raise CheckCondition(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, information=mismatch)
        return ScsiResult(wanted=length)

    async def _write_same(self, op: int, cdb: bytes, data: bytearray | None) -> ScsiResult:
        if op == Op.WRITE_SAME_10:
            lba, count = _u32(cdb, 2), _u16(cdb, 7)
            ndob = False
        else:
            lba, count = _u64(cdb, 2), _u32(cdb, 10)
            ndob = bool(cdb[1] & 0x01)
        flags = cdb[1]
        unmap = bool(flags & 0x08)
        if flags & 0xE0:
            raise illegal(field=1)
        if flags & 0x10:  # ANCHOR: no anchored state (VPD B2 ANC_SUP=0)
            raise illegal(field=1)
        if flags & 0x06:  # PBDATA / LBDATA: no
            raise illegal(field=1)
        if lba > self.blocks:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
        if count == 0:
            # WSNZ=0 (VPD B0): zero blocks means "to the end of the medium" (SBC-3 5.45).
            count = self.blocks - lba
            if count == 0:
                return ScsiResult(wanted=0 if ndob else BLOCK_SIZE)
        if count > MAX_WRITE_SAME_BLOCKS:
            raise illegal(field=7 if op == Op.WRITE_SAME_10 else 10)
        self._check_range(lba, count)
        if ndob:
            block = bytes(BLOCK_SIZE)
        else:
            if data is None or len(data) != BLOCK_SIZE:
                # The Data-Out is exactly one logical block.
                raise illegal(field=7 if op == Op.WRITE_SAME_10 else 10)
            block = bytes(data[:BLOCK_SIZE])
        offset, length = lba << BLOCK_SHIFT, count << BLOCK_SHIFT
        step = self.volume.capabilities.maximum_block
        if unmap or not any(block):
            # UNMAP=1: the blocks are deallocated and read zeros (LBPRZ), whatever the
            # Data-Out holds (what libiscsi's UnmapUntilEnd checks, and what tgt does).
            # Zeros without UNMAP stay mapped (SBC-3 5.45: UNMAP=0 writes the blocks).
            for start in range(0, length, step):
                n = min(step, length - start)
                if unmap:
                    await self.volume.trim(offset + start, n)
                else:
                    await self.volume.write_zeroes(offset + start, n, may_trim=False)
            return ScsiResult(wanted=0 if ndob else BLOCK_SIZE)
        chunk = block * (min(length, _WRITE_SAME_CHUNK) // BLOCK_SIZE)
        pos = 0
        while pos < length:
            n = min(len(chunk), length - pos)
            await self.volume.write(offset + pos, memoryview(chunk)[:n])
            pos += n
        return ScsiResult(wanted=BLOCK_SIZE)

    async def _unmap(self, cdb: bytes, data: bytearray | None) -> ScsiResult:
        if cdb[1] & 0x01:  # ANCHOR
            raise illegal(field=1)
        length = _u16(cdb, 7)
        if length == 0:
            return ScsiResult(wanted=0)
        if length < 8:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)
        params = bytes(data or b"")[:length]
        if len(params) < 8:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)
        descriptor_bytes = _u16(params, 2)
        usable = min(descriptor_bytes, len(params) - 8) // 16 * 16
        count = usable // 16
        if count > MAX_UNMAP_DESCRIPTORS:
            raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST)
        ranges = []
        for i in range(count):
            base = 8 + 16 * i
            lba, blocks = _u64(params, base), _u32(params, base + 8)
            if blocks > MAX_UNMAP_BLOCKS:
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST)
            self._check_range(lba, blocks)
            if blocks:
                ranges.append((lba << BLOCK_SHIFT, blocks << BLOCK_SHIFT))
        step = self.volume.capabilities.maximum_block
        for offset, n in ranges:
            for start in range(0, n, step):
                await self.volume.trim(offset + start, min(step, n - start))
        return ScsiResult(wanted=length)

    async def _get_lba_status(self, cdb: bytes) -> ScsiResult:
        lba = _u64(cdb, 2)
        allocation = _u32(cdb, 10)
        if lba >= self.blocks:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
        if allocation == 0:
            return ScsiResult(wanted=0)
        room = max(1, (allocation - 8) // 16)
        offset = lba << BLOCK_SHIFT
        remaining = self.volume.size - offset
        step = self.volume.capabilities.maximum_block
        descriptors: list[tuple[int, int, int]] = []
        pos = offset
        while remaining > 0 and len(descriptors) < room:
            extents = await self.volume.block_status(pos, min(remaining, step))
            if not extents:
                break
            for extent in extents:
                status = 1 if extent.flags & ExtentFlags.HOLE else 0
                start_lba = pos >> BLOCK_SHIFT
                blocks = extent.length >> BLOCK_SHIFT
                if (
                    descriptors
                    and descriptors[-1][2] == status
                    and descriptors[-1][0] + descriptors[-1][1] == start_lba
                ):
                    first, n, _ = descriptors[-1]
                    descriptors[-1] = (first, n + blocks, status)
                elif len(descriptors) < room:
                    descriptors.append((start_lba, blocks, status))
                else:
                    remaining = 0
                    break
                pos += extent.length
                remaining -= extent.length
            # Keep going only while the last descriptor may still grow (one full answer).
            if len(descriptors) >= room:
                break
        body = b"".join(
            struct.pack(">QIB3x", first, min(n, 0xFFFFFFFF), status) for first, n, status in descriptors
        )
        out = (len(body) + 4).to_bytes(4, "big") + bytes(4) + body
        return ScsiResult(data=out[:allocation])

    # --- information ---------------------------------------------------------------------------
    def _inquiry(self, cdb: bytes) -> ScsiResult:
        evpd = cdb[1] & 0x01
        page = cdb[2]
        allocation = _u16(cdb, 3)
        if cdb[1] & 0xFE:
            raise illegal(field=1)
        if not evpd:
            if page:
                raise illegal(field=2)
            data = self._standard_inquiry()
        else:
            data = self._vpd(page)
        return ScsiResult(data=data[:allocation])

    def _peripheral(self) -> int:
        # Qualifier 3 ("not capable of supporting a device on this LUN") once the VV is gone.
        return 0x7F if self.gone else 0x00

    def _standard_inquiry(self) -> bytes:
        data = bytearray(96)
        data[0] = self._peripheral()
        data[2] = 0x06  # SPC-4
        data[3] = 0x12  # HiSup, response data format 2
        data[4] = len(data) - 5
        data[5] = 0x00
        data[7] = 0x02  # CmdQue
        data[8:16] = VENDOR
        data[16:32] = PRODUCT
        data[32:36] = REVISION
        # Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
        for i, code in enumerate((0x00A0, 0x0960, 0x0460, 0x04C0)):
            data[58 + 2 * i : 60 + 2 * i] = code.to_bytes(2, "big")
        return bytes(data)

    def _vpd(self, page: int) -> bytes:
        if page == 0x00:
            body = bytearray([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
        elif page == 0x80:
            body = bytearray(self.serial.encode())
        elif page == 0x83:
            name = self.target_name.encode()
            name += bytes(-len(name) % 4 or 4)  # NUL-terminated, padded to 4 bytes
            body = bytearray(
                designator(0x01, 0x03, self.naa)  # NAA, binary, associated with the LU
                + designator(0x02, 0x01, VENDOR + self.serial.encode())  # T10 vendor ID, ASCII
                + designator(0x03, 0x28, name, piv_protocol=5)  # SCSI name string, target device
            )
        elif page == 0xB0:
            body = bytearray(0x3C)
            body[0] = 0x00  # WSNZ=0: WRITE SAME of zero blocks runs to the end of the LU
            body[2:4] = (self.region_blocks if self.region_blocks < 0x10000 else 0).to_bytes(2, "big")
            body[4:8] = MAX_TRANSFER_BLOCKS.to_bytes(4, "big")
            body[8:12] = min(self.region_blocks, MAX_TRANSFER_BLOCKS).to_bytes(4, "big")
            body[16:20] = MAX_UNMAP_BLOCKS.to_bytes(4, "big")
            body[20:24] = MAX_UNMAP_DESCRIPTORS.to_bytes(4, "big")
            body[24:28] = self.region_blocks.to_bytes(4, "big")  # optimal unmap granularity
            body[28:32] = (0x80000000).to_bytes(4, "big")  # UGAVALID, alignment 0
            body[32:40] = MAX_WRITE_SAME_BLOCKS.to_bytes(8, "big")
        elif page == 0xB1:
            body = bytearray(0x3C)
            body[0:2] = (1).to_bytes(2, "big")  # medium rotation rate: non-rotating
        elif page == 0xB2:
            # threshold exponent 0; LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type 2 (thin)
            body = bytearray([0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])
        else:
            raise illegal(field=2)
        return bytes([self._peripheral(), page]) + len(body).to_bytes(2, "big") + body

    def _read_capacity_10(self, cdb: bytes) -> ScsiResult:
        if cdb[8] & 0x01 or _u32(cdb, 2):  # PMI and LBA are obsolete: must be zero
            raise illegal(field=2 if _u32(cdb, 2) else 8)
        last = self.blocks - 1
        return ScsiResult(data=min(last, 0xFFFFFFFF).to_bytes(4, "big") + BLOCK_SIZE.to_bytes(4, "big"))

    def _read_capacity_16(self, cdb: bytes) -> ScsiResult:
        allocation = _u32(cdb, 10)
        data = bytearray(32)
        data[0:8] = (self.blocks - 1).to_bytes(8, "big")
        data[8:12] = BLOCK_SIZE.to_bytes(4, "big")
        data[13] = PHYSICAL_BLOCK_EXPONENT
        data[14] = 0x80 | 0x40  # LBPME, LBPRZ
        return ScsiResult(data=bytes(data[:allocation]))

    def _report_luns(self, cdb: bytes) -> ScsiResult:
        select = cdb[2]
        allocation = _u32(cdb, 6)
        if select not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
            raise illegal(field=2)
        if allocation < 16:
            raise illegal(field=6)
        luns = [] if select in (0x01, 0x11) else [0]
        data = (
            (8 * len(luns)).to_bytes(4, "big") + bytes(4) + b"".join(lun.to_bytes(8, "big") for lun in luns)
        )
        return ScsiResult(data=data[:allocation])

    def _request_sense(self, nexus: Nexus, cdb: bytes) -> ScsiResult:
        if cdb[1] & 0x01:  # DESC: descriptor format is not supported
            raise illegal(field=1)
        allocation = cdb[4]
        queue = self.pending_ua.get(nexus)
        if queue:
            from .sense import fixed_sense

            sense = fixed_sense(SenseKey.UNIT_ATTENTION, queue.pop(0))
        else:
            sense = self.sense.pop(nexus, b"") or bytes([0x70, 0, 0, 0, 0, 0, 0, 10]) + bytes(10)
        return ScsiResult(data=sense[:allocation])

    # --- mode pages -----------------------------------------------------------------------------
    def _mode_pages(self, page: int, subpage: int, pc: int) -> bytes:
        writeback = str(getattr(self.volume, "cache_mode", "writethrough")) in (
            "writeback",
            "CacheMode.WRITEBACK",
        )
        changeable = pc == 1
        caching = bytearray(20)
        caching[0], caching[1] = 0x08, 18
        if not changeable:
            caching[2] = 0x04 if writeback else 0x00  # WCE: a write is acknowledged from cache
        control = bytearray(12)
        control[0], control[1] = 0x0A, 10
        if not changeable:
            control[2] = 0x02 if False else 0x00  # GLTSD=0
            control[3] = 0x10  # QUEUE ALGORITHM MODIFIER 1: unrestricted reordering
            control[5] = 0x40 if False else 0x00
            control[8:10] = (0xFFFF).to_bytes(2, "big")  # busy timeout period: unlimited
        informational = bytearray(12)
        informational[0], informational[1] = 0x1C, 10
        pages = {0x08: bytes(caching), 0x0A: bytes(control), 0x1C: bytes(informational)}
        if subpage not in (0x00, 0xFF):
            raise illegal(field=3)
        if page == 0x3F:
            return b"".join(pages[p] for p in sorted(pages))
        if page not in pages:
            raise illegal(field=2)
        return pages[page]

    def _mode_sense(self, op: int, cdb: bytes) -> ScsiResult:
        dbd = bool(cdb[1] & 0x08)
        pc = cdb[2] >> 6
        page = cdb[2] & 0x3F
        subpage = cdb[3]
        if pc == 3:
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED)
        pages = self._mode_pages(page, subpage, pc)
        descriptor = b""
        if not dbd:
            blocks = min(self.blocks, 0xFFFFFFFF)
            descriptor = blocks.to_bytes(4, "big") + BLOCK_SIZE.to_bytes(4, "big")
        device_specific = 0x10  # DPOFUA: DPO and FUA are supported
        if not self.volume.capabilities.can_write:
            device_specific |= 0x80  # WP: the medium is write-protected (a snapshot)
        if op == Op.MODE_SENSE_6:
            allocation = cdb[4]
            header = bytes([0, 0, device_specific, len(descriptor)])
            data = bytearray(header + descriptor + pages)
            data[0] = min(len(data) - 1, 0xFF)
        else:
            allocation = _u16(cdb, 7)
            header = bytes([0, 0, 0, device_specific, 0, 0]) + len(descriptor).to_bytes(2, "big")
            data = bytearray(header + descriptor + pages)
            data[0:2] = (len(data) - 2).to_bytes(2, "big")
        return ScsiResult(data=bytes(data[:allocation]))

    def _mode_select(self, op: int, cdb: bytes, data: bytearray | None) -> ScsiResult:
        if op == Op.MODE_SELECT_6:
            length = cdb[4]
            header_length = 4
        else:
            length = _u16(cdb, 7)
            header_length = 8
        if cdb[1] & 0x01:  # SP: saving pages is not supported
            raise CheckCondition(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB, field=1)
        if length == 0:
            return ScsiResult(wanted=0)
        params = bytes(data or b"")[:length]
        if len(params) < header_length:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)
        descriptor_length = params[3] if op == Op.MODE_SELECT_6 else _u16(params, 6)
        pos = header_length + descriptor_length
        # Nothing is changeable (the changeable mask is all zeros): a page equal to the
        # current one is accepted, any change is refused.
        while pos + 2 <= len(params):
            code = params[pos] & 0x3F
            page_length = params[pos + 1] + 2
            page = params[pos : pos + page_length]
            try:
                current = self._mode_pages(code, 0, 0)
            except CheckCondition:
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST) from None
            if bytes([page[0] & 0x3F]) + page[1:] != current[: len(page)]:
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST)
            pos += page_length
        return ScsiResult(wanted=length)

    # --- REPORT SUPPORTED OPERATION CODES --------------------------------------------------------
    def _report_supported_opcodes(self, cdb: bytes) -> ScsiResult:
        rctd = bool(cdb[2] & 0x80)
        options = cdb[2] & 0x07
        requested_op = cdb[3]
        requested_sa = _u16(cdb, 4)
        allocation = _u32(cdb, 6)
        timeouts = bytes([0, 10, 0, 0]) + (0).to_bytes(4, "big") + (30).to_bytes(4, "big")
        if options == 0:
            body = bytearray()
            for (opcode, sa), usage in sorted(_USAGE.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
                flags = (0x01 if sa is not None else 0) | (0x02 if rctd else 0)
                body += bytes([opcode, 0]) + (sa or 0).to_bytes(2, "big") + bytes([0, flags])
                body += len(usage).to_bytes(2, "big")
                if rctd:
                    body += timeouts
            data = len(body).to_bytes(4, "big") + bytes(body)
        elif options in (1, 2, 3):
            if options == 1 and requested_op in _SERVICE_ACTION_OPS:
                raise illegal(field=3)
            if options == 2 and requested_op not in _SERVICE_ACTION_OPS:
                raise illegal(field=3)
            key = (requested_op, requested_sa if requested_op in _SERVICE_ACTION_OPS else None)
            found = _USAGE.get(key)
            support = 0x03 if found is not None else 0x01
            usage = found or b""
            data = bytes([0, support | (0x80 if rctd else 0)]) + len(usage).to_bytes(2, "big") + usage
            if rctd and usage:
                data += timeouts
        else:
            raise illegal(field=2)
        return ScsiResult(data=data[:allocation])

    # --- persistent reservations (SPC-4 5.12) ------------------------------------------------------
    def _check_reservation(self, nexus: Nexus, op: int, cdb: bytes) -> None:
        r = self.reservations
        if r.holder is None or op in _ALLOWED_UNDER_RESERVATION:
            return
        if r.type in _ALL_REGISTRANTS or r.type in _REGISTRANTS_ONLY:
            if nexus in r.keys:
                return
        elif nexus == r.holder:
            return
        if r.type in _WRITE_EXCLUSIVE and op in _READS | {Op.MODE_SENSE_6, Op.MODE_SENSE_10}:
            return
        raise _ReservationConflict()

    def _is_holder(self, nexus: Nexus) -> bool:
        r = self.reservations
        if r.holder is None:
            return False
        if r.type in _ALL_REGISTRANTS:
            return nexus in r.keys
        return r.holder == nexus

    def _persistent_reserve_in(self, nexus: Nexus, cdb: bytes) -> ScsiResult:
        sa = cdb[1] & 0x1F
        allocation = _u16(cdb, 7)
        r = self.reservations
        if sa == 0x00:  # READ KEYS
            keys = b"".join(k.to_bytes(8, "big") for k in r.keys.values())
            data = r.generation.to_bytes(4, "big") + len(keys).to_bytes(4, "big") + keys
        elif sa == 0x01:  # READ RESERVATION
            if r.holder is None:
                data = r.generation.to_bytes(4, "big") + bytes(4)
            else:
                key = 0 if r.type in _ALL_REGISTRANTS else r.keys.get(r.holder, 0)
                body = key.to_bytes(8, "big") + bytes(4) + bytes([0, r.type & 0x0F, 0, 0])
                data = r.generation.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body
        elif sa == 0x03:  # READ FULL STATUS
            full = bytearray()
            for registrant, key in r.keys.items():
                holder = self._is_holder(registrant) and r.holder is not None
                transport_id = _iscsi_transport_id(registrant)
                full += key.to_bytes(8, "big") + bytes(4)
                full += bytes([0x01 if holder else 0x00, r.type & 0x0F if holder else 0])
                full += bytes(4) + (1).to_bytes(2, "big")  # relative target port 1
                full += len(transport_id).to_bytes(4, "big") + transport_id
            data = r.generation.to_bytes(4, "big") + len(full).to_bytes(4, "big") + full
        elif sa == 0x02:  # REPORT CAPABILITIES
            data = bytes([0, 8, 0x00, 0x80 | 0x01, 0xEA, 0x01, 0, 0])  # TMV, PTPL_A; types mask
        else:
            raise illegal(field=1)
        return ScsiResult(data=data[:allocation])

    def _persistent_reserve_out(self, nexus: Nexus, cdb: bytes, data: bytearray | None) -> ScsiResult:
        sa = cdb[1] & 0x1F
        scope_type = cdb[2]
        length = _u32(cdb, 5)
        if length != 24:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)
        params = bytes(data or b"")
        if len(params) < 24:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR)
        key = _u64(params, 0)
        sa_key = _u64(params, 8)
        if params[20] & 0x0D:  # SPEC_I_PT, ALL_TG_PT, APTPL: not supported
            raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST)
        r = self.reservations
        registered = r.keys.get(nexus)
        rtype = scope_type & 0x0F
        if sa in (0x00, 0x06):  # REGISTER, REGISTER AND IGNORE EXISTING KEY
            if sa == 0x00 and (registered if registered is not None else 0) != key:
                raise _ReservationConflict()
            if sa_key == 0:
                if registered is not None:
                    self._unregister(nexus)
            else:
                r.keys[nexus] = sa_key
            r.generation += 1
            return ScsiResult(wanted=24)
        if registered is None or registered != key:
            raise _ReservationConflict()
        if sa == 0x01:  # RESERVE
            if scope_type & 0xF0:
                raise illegal(field=2)
            if rtype not in _VALID_TYPES:
                raise illegal(field=2)
            if r.holder is not None and not self._is_holder(nexus):
                raise _ReservationConflict()
            if r.holder is not None and r.type != rtype:
                raise _ReservationConflict()
            r.holder, r.type = nexus, rtype
            return ScsiResult(wanted=24)
        if sa == 0x02:  # RELEASE
            if r.holder is None or not self._is_holder(nexus):
                return ScsiResult(wanted=24)
            if r.type != rtype:
                raise CheckCondition(SenseKey.ILLEGAL_REQUEST, 0x2604)  # invalid release of PR
            r.holder, r.type = None, 0
            return ScsiResult(wanted=24)
        if sa == 0x03:  # CLEAR
            r.keys.clear()
            r.holder, r.type = None, 0
            r.generation += 1
            return ScsiResult(wanted=24)
        if sa in (0x04, 0x05):  # PREEMPT, PREEMPT AND ABORT
            if rtype not in _VALID_TYPES:
                raise illegal(field=2)
            victims = [n for n, k in r.keys.items() if k == sa_key]
            if r.holder is not None and (r.type in _ALL_REGISTRANTS and sa_key == 0):
                victims = [n for n in r.keys if n != nexus]
            elif not victims and sa_key == 0:
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST)
            holder_key: int | None = r.keys.get(r.holder) if r.holder is not None else None
            for victim in victims:
                if victim != nexus:
                    self._unregister(victim, release=False)
            if r.holder is None or r.type in _ALL_REGISTRANTS or holder_key == sa_key:
                r.holder, r.type = nexus, rtype
            r.generation += 1
            return ScsiResult(wanted=24)
        raise illegal(field=1)

    def _unregister(self, nexus: Nexus, *, release: bool = True) -> None:
        r = self.reservations
        r.keys.pop(nexus, None)
        if (r.holder == nexus and r.type not in _ALL_REGISTRANTS) or (
            r.type in _ALL_REGISTRANTS and not r.keys
        ):
            r.holder, r.type = None, 0

    def describe(self) -> dict[str, Any]:
        return {"vv": self.volume.name, "nexuses": sorted(self.nexuses)}


def _spans_result(pieces: list[SpanPiece], length: int) -> ScsiResult:
    """A read answered by ``read_spans``: its FileSpans when every piece is one, else the
    bytes (holes read as zeros: LBPRZ)."""
    if all(isinstance(piece[2], FileSpan) for piece in pieces):
        return ScsiResult(spans=[piece[2] for piece in pieces])  # type: ignore[misc]
    if len(pieces) == 1 and pieces[0][2] is not None and pieces[0][1] == length:
        return ScsiResult(data=pieces[0][2])  # type: ignore[arg-type]
    out = bytearray(length)
    start = pieces[0][0] if pieces else 0
    for offset, n, data in pieces:
        if data is not None:
            out[offset - start : offset - start + n] = (
                data.read_part() if isinstance(data, FileSpan) else data
            )
    return ScsiResult(data=out)


def _iscsi_transport_id(nexus: Nexus) -> bytes:
    """SPC-4 7.6.4.6: an iSCSI TransportID with the initiator port (name,i,0xISID), format 01b."""
    name = nexus.encode() + b"\0"
    name += bytes(-len(name) % 4)
    return bytes([0x40 | 0x05, 0]) + len(name).to_bytes(2, "big") + name


class _ReservationConflict(CheckCondition):
    """RESERVATION CONFLICT is a status of its own, without sense data."""

    def __init__(self) -> None:
        Exception.__init__(self, "reservation conflict")
        self.key = SenseKey.NO_SENSE
        self.asc = 0
        self.sense = b""
        self.wanted = 0
