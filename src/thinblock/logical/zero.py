"""The zero LD: the one logical disk with no physical storage.

Every region of a new VV points here (the patent's "zero logical disk"; SPDK blobstore's
zero device plays the same part).  It is a real device object, not ``None``, so the
volume layer can treat "unallocated" and "allocated" regions alike: reads return zeros
and touch no disk, writes are refused (a write to an unallocated region must go through
allocation first), zeroing and flushing have nothing to do.
"""

from __future__ import annotations

from ..blockdev import Buffer
from ..errors import ReadOnlyDevice
from ..model import LDHealth
from ..units import MiB

ZERO_LD_ID = 0  # the id the zero LD reports; LDs from the metadata store are numbered from 1

_CHUNK = 1 * MiB
_ZEROS = memoryview(bytes(_CHUNK))


class ZeroLD:
    """Reads as zeros everywhere, refuses writes.  Use the ``ZERO_LD`` singleton."""

    id = ZERO_LD_ID
    size = 2**63 - 1
    health = LDHealth.NORMAL

    def read_into(self, offset: int, buf: memoryview) -> None:
        n = len(buf)
        if n <= _CHUNK:
            buf[:] = _ZEROS[:n]
            return
        for pos in range(0, n, _CHUNK):
            take = min(_CHUNK, n - pos)
            buf[pos : pos + take] = _ZEROS[:take]

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)  # calloc'd: no page is touched until the caller reads it

    def write(self, offset: int, data: Buffer) -> None:
        raise ReadOnlyDevice(
            f"the zero LD cannot be written ({len(data)} bytes at offset {offset}): "
            "a region must be assigned an LD region before it is written"
        )

    def zero(self, offset: int, length: int) -> None:
        """Already zeros."""

    def flush(self) -> None:
        """Nothing to make durable."""

    def is_readable(self, offset: int, length: int) -> bool:
        return True

    def failed_members(self) -> list[tuple[int, int]]:
        return []

    def __repr__(self) -> str:
        return "ZERO_LD"


ZERO_LD = ZeroLD()
