"""The PD header: who a PD is, where it belongs, and what it last heard.

Like an md superblock or an LVM label, every PD the engine uses starts with a header area
(``HEADER_AREA``, 1 MiB, so chunklets stay aligned for O_DIRECT) holding a small record:

* ``pd_id`` and ``data_dir_id``: the PD's id in its data directory's store, and that data
  directory's id (a UUID made once per data directory and kept in the store).  A file put in
  a PD's place, or a PD of another data directory, is recognised as such instead of served.
* ``size`` and ``chunklet_size``: the PD as formatted (``size`` counts chunklet space, after
  the header area).  A PD file cut short is recognised too.
* ``store_generation``: the metadata store's generation when the header was written.  The
  store's generation only grows and is made durable before any header carries it, so a PD
  header ahead of the store means the store lost commits (a deleted WAL, an old copy).
* ``events`` and ``failed_pds``: the failure-event record (md's event counter).  Each PD
  failure bumps ``events`` and is written, with the set of PDs failed at that point, to the
  header of every PD still in service before anything more is acknowledged.  At open, the
  freshest record names the PDs that may be stale, whatever the store says.

On disk: two 4 KiB slots at offsets 0 and 4 KiB, written alternately, each with a sequence
number and a CRC-32, so a torn header write leaves the other slot intact (the newest valid
slot wins).  All integers little-endian::

    magic "THINBLKP" | version u32 | length u32 | sequence u64 | pd_id u64 | data_dir_id 16s
    | size u64 | chunklet_size u64 | data_offset u64 | store_generation u64 | events u64
    | failed count u32 | failed PD ids u64 * count | crc32 u32 (of everything before it)

The API is three functions on a file descriptor: ``read_header`` (None for a PD without a
thinblock header), ``write_header`` (durable when it returns) and ``check_header`` (what is
wrong with a header for a given PD, or None).
"""

from __future__ import annotations

import errno
import os
import struct
import uuid
import zlib
from dataclasses import dataclass, field, replace

from ..units import KiB, MiB

HEADER_AREA = 1 * MiB  # reserved at the start of every PD; chunklets begin after it
SLOT_SIZE = 4 * KiB
SLOTS = (0, SLOT_SIZE)
MAGIC = b"THINBLKP"
FORMAT_VERSION = 1

_FIXED = struct.Struct("<8sIIQQ16sQQQQQI")
_CRC = struct.Struct("<I")
MAX_FAILED = (SLOT_SIZE - _FIXED.size - _CRC.size) // 8  # 502 failed PD ids fit in a slot


class HeaderError(Exception):
    """A thinblock header that cannot be used: damaged in both slots, or of a newer format."""


@dataclass(frozen=True, slots=True)
class PDHeader:
    pd_id: int
    data_dir_id: str  # the data directory's UUID, as text
    size: int  # chunklet space in bytes (after the header area)
    chunklet_size: int
    data_offset: int = HEADER_AREA
    store_generation: int = 0
    events: int = 0
    failed_pds: frozenset[int] = field(default_factory=frozenset)

    def with_record(self, *, store_generation: int, events: int, failed_pds: frozenset[int]) -> PDHeader:
        return replace(self, store_generation=store_generation, events=events, failed_pds=failed_pds)


def new_data_dir_id() -> str:
    return str(uuid.uuid4())


def _encode(header: PDHeader, sequence: int) -> bytes:
    failed = sorted(header.failed_pds)
    if len(failed) > MAX_FAILED:
        raise ValueError(f"a PD header records at most {MAX_FAILED} failed PDs, not {len(failed)}")
    body = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        _FIXED.size + 8 * len(failed),
        sequence,
        header.pd_id,
        uuid.UUID(header.data_dir_id).bytes,
        header.size,
        header.chunklet_size,
        header.data_offset,
        header.store_generation,
        header.events,
        len(failed),
    ) + struct.pack(f"<{len(failed)}Q", *failed)
    slot = body + _CRC.pack(zlib.crc32(body))
    return slot + bytes(SLOT_SIZE - len(slot))


def _decode(slot: bytes) -> tuple[int, PDHeader] | str | None:
    """(sequence, header); a string saying why a thinblock slot is unusable; None: no magic."""
    if len(slot) < _FIXED.size or slot[:8] != MAGIC:
        return None
    fields = _FIXED.unpack_from(slot)
    version, length = fields[1], fields[2]
    if version != FORMAT_VERSION:
        return f"header format version {version} (this thinblock reads {FORMAT_VERSION})"
    count = fields[11]
    if count > MAX_FAILED or length != _FIXED.size + 8 * count or length + _CRC.size > len(slot):
        return "header damaged (bad length)"
    (crc,) = _CRC.unpack_from(slot, length)
    if crc != zlib.crc32(slot[:length]):
        return "header damaged (checksum mismatch)"
    failed = struct.unpack_from(f"<{count}Q", slot, _FIXED.size)
    header = PDHeader(
        pd_id=fields[4],
        data_dir_id=str(uuid.UUID(bytes=fields[5])),
        size=fields[6],
        chunklet_size=fields[7],
        data_offset=fields[8],
        store_generation=fields[9],
        events=fields[10],
        failed_pds=frozenset(failed),
    )
    return fields[3], header


def _read_slots(fd: int) -> list[tuple[int, PDHeader] | str | None]:
    out: list[tuple[int, PDHeader] | str | None] = []
    for offset in SLOTS:
        out.append(_decode(os.pread(fd, SLOT_SIZE, offset)))
    return out


def _newest(slots: list[tuple[int, PDHeader] | str | None]) -> tuple[int, PDHeader] | None:
    valid = [s for s in slots if isinstance(s, tuple)]
    return max(valid, key=lambda s: s[0]) if valid else None


def read_header(fd: int) -> PDHeader | None:
    """The PD's header (the newest valid slot); None when the PD holds no thinblock header at
    all (blank, or other data).  HeaderError when it has one that cannot be used.  OSError
    from the read passes through."""
    slots = _read_slots(fd)
    newest = _newest(slots)
    if newest is not None:
        return newest[1]
    problems = [s for s in slots if isinstance(s, str)]
    if problems:
        raise HeaderError(problems[0])
    return None


def write_header(fd: int, header: PDHeader) -> None:
    """Write ``header`` into the older slot, durably (only the slot's range is synced: a
    ``RWF_DSYNC`` write, or ``pwrite`` then ``fdatasync`` where that flag is not known).
    OSError passes through; the other slot still holds the previous header."""
    slots = _read_slots(fd)
    newest = _newest(slots)
    sequence = 1 if newest is None else newest[0] + 1
    # The slot not holding the newest header (a damaged or blank one first).
    target = SLOTS[0]
    if newest is not None:
        newest_index = next(i for i, s in enumerate(slots) if isinstance(s, tuple) and s[0] == newest[0])
        target = SLOTS[1 - newest_index]
    data = _encode(header, sequence)
    _durable_pwrite(fd, data, target)


def _durable_pwrite(fd: int, data: bytes, offset: int) -> None:
    flag = getattr(os, "RWF_DSYNC", 0)
    if flag:
        try:
            done = os.pwritev(fd, [data], offset, flag)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        else:
            if done != len(data):
                raise OSError(errno.EIO, f"short header write ({done} of {len(data)} bytes)")
            return
    done = os.pwrite(fd, data, offset)
    if done != len(data):
        raise OSError(errno.EIO, f"short header write ({done} of {len(data)} bytes)")
    os.fdatasync(fd)


def check_header(
    header: PDHeader | None, *, pd_id: int, data_dir_id: str, size: int, chunklet_size: int
) -> str | None:
    """What makes ``header`` wrong for PD ``pd_id`` of data directory ``data_dir_id`` formatted
    at ``size`` bytes with ``chunklet_size`` chunklets; None when it is right."""
    if header is None:
        return "it has no thinblock header (another file or device in its place?)"
    if header.data_dir_id != data_dir_id:
        return (
            f"its header belongs to another data directory ({header.data_dir_id}, this one is {data_dir_id})"
        )
    if header.pd_id != pd_id:
        return f"its header says it is PD {header.pd_id}"
    if header.size != size or header.chunklet_size != chunklet_size:
        return (
            f"its header says {header.size} bytes in chunklets of {header.chunklet_size},"
            f" the store {size} in chunklets of {chunklet_size}"
        )
    if header.data_offset != HEADER_AREA:
        return f"its header puts chunklets at offset {header.data_offset}, not {HEADER_AREA}"
    return None
