"""PostgreSQL's binary COPY format, read into a numpy array: bytes in, rows out (sans-IO).

Why: the region map of a million regions, read as COPY text (about 30 bytes a row) and parsed
after the whole text was in memory, held text and array side by side: the open's peak was
214 MiB against 127 MiB once open (bench/results/2026-12-03-vm-metadata-open-quiet.md).  The
binary format has a fixed size per row when every column is a non-NULL ``bigint`` (50 bytes
for four), so each block the server sends is parsed at once, a whole number of rows at a time,
straight into an array allocated for the row count read before; only a block's worth of bytes
is held at any moment.

The format (PostgreSQL 15 documentation, COPY, "Binary Format"):

* header: the 11-byte signature ``PGCOPY\\n\\377\\r\\n\\0``; a 32-bit flags field ("bits 0-15
  are reserved to signal backwards-incompatible format issues; a reader should abort if it
  finds an unexpected bit set in this range", bit 16 says OIDs are included: not ours either;
  bits 17-31 "a reader should simply ignore"); a 32-bit header extension length, then that many
  bytes, skipped;
* each tuple: a 16-bit field count, then per field a 32-bit length (-1: NULL) and that many
  bytes of value (``int8``: 8 bytes, network byte order);
* trailer: a 16-bit word holding -1.

All integers are in network byte order.  Anything else -- another field count, a NULL, a value
that is not 8 bytes, more or fewer rows than counted, bytes after the trailer, no trailer -- is
``BadCopy``: the caller names its store and refuses the map.
"""

from __future__ import annotations

import struct
from typing import NoReturn

import numpy as np

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_HEADER = len(SIGNATURE) + 8  # signature, flags, extension length
_INCOMPATIBLE_FLAGS = 0x0001FFFF  # bits 0-15 (reserved) and 16 (OIDs included)
TRAILER = b"\xff\xff"
DEFAULT_BLOCK = 256 * 1024  # bytes gathered before they are parsed (the held bytes' bound)


class BadCopy(ValueError):
    """The bytes are not a binary COPY of the expected rows."""


def tuple_dtype(columns: int) -> np.dtype:
    """One tuple of ``columns`` non-NULL int8 fields, as it is on the wire."""
    fields: list[tuple[str, str]] = [("count", ">i2")]
    for i in range(columns):
        fields += [(f"len{i}", ">i4"), (f"value{i}", ">i8")]
    return np.dtype(fields)


class Int8CopyReader:
    """Parses the binary COPY of ``rows`` rows of ``columns`` int8 columns into ``array``.

    ``feed`` each block as it comes (any boundaries: a block may end inside the header, a tuple
    or the trailer), then ``finish``; both raise ``BadCopy``.  At most ``block`` bytes (plus one
    fed block) are held between calls."""

    def __init__(self, rows: int, columns: int, *, block: int = DEFAULT_BLOCK) -> None:
        assert rows >= 0 and columns > 0 and block > 0
        self.array = np.empty((rows, columns), dtype=np.int64)
        self.columns = columns
        self._dtype = tuple_dtype(columns)
        self._block = block
        self._pending = bytearray()
        self._header_read = False
        self._ended = False
        self._filled = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._ended:
            if len(data):
                raise BadCopy("data after the end of the COPY")
            return
        self._pending += data
        if len(self._pending) >= self._block:
            self._parse()

    def finish(self) -> np.ndarray:
        self._parse()
        if not self._header_read:
            raise BadCopy("the COPY ended inside its header" if self._pending else "no COPY header")
        if not self._ended:
            held = bytes(self._pending)
            if held.startswith(TRAILER) and len(held) > len(TRAILER):
                raise BadCopy("data after the end of the COPY")
            if held != TRAILER:
                self._diagnose(0)
            self._pending.clear()
            self._ended = True
        if self._filled != len(self.array):
            raise BadCopy(f"the COPY held {self._filled} rows, {len(self.array)} were counted")
        return self.array

    # --- parsing what is held ---
    def _parse(self) -> None:
        if not self._header_read and not self._read_header():
            return
        if self._ended:
            return
        size = self._dtype.itemsize
        n = len(self._pending) // size
        if n == 0:
            return
        # In a function of its own: every view of the bytearray dies with its frame, before the
        # bytearray is shortened (it cannot be while a view of it lives).
        taken, ended = self._take(n)
        if ended:
            raise BadCopy("data after the end of the COPY")
        del self._pending[: taken * size]

    def _take(self, n: int) -> tuple[int, bool]:
        """Check and copy the first ``n`` held tuples into the array: (tuples taken, whether
        the trailer came among them, bytes after it)."""
        tuples = np.frombuffer(self._pending, dtype=self._dtype, count=n)
        bad = tuples["count"] != self.columns
        for i in range(self.columns):
            bad |= tuples[f"len{i}"] != 8
        wrong = np.flatnonzero(bad)
        ended = False
        if len(wrong):
            first = int(wrong[0])
            if tuples["count"][first] != -1:
                self._diagnose(first * self._dtype.itemsize)
            # The trailer, with a whole tuple's worth of bytes after it: the rows before it are
            # good, the rest is not.
            ended, n = True, first
            tuples = tuples[:first]
        if self._filled + n > len(self.array):
            raise BadCopy(f"the COPY holds more rows than the {len(self.array)} counted")
        rows = self.array[self._filled : self._filled + n]
        for i in range(self.columns):
            rows[:, i] = tuples[f"value{i}"]
        self._filled += n
        return n, ended

    def _diagnose(self, offset: int) -> NoReturn:
        """The held row at ``offset`` (a row boundary) is not a whole row of ``columns`` 8-byte
        values: say what it is, field by field (the slow path, on errors only)."""
        held = bytes(self._pending[offset:])
        if len(held) >= 2:
            (count,) = struct.unpack_from(">h", held)
            if count != self.columns:
                raise BadCopy(f"a row with {count} fields, {self.columns} expected")
            pos = 2
            for i in range(count):
                if len(held) < pos + 4:
                    break
                (length,) = struct.unpack_from(">i", held, pos)
                if length == -1:
                    raise BadCopy(f"column {i + 1} holds a NULL")
                if length != 8:
                    raise BadCopy(f"column {i + 1} holds a value of {length} bytes, not an 8-byte integer")
                pos += 12
        raise BadCopy(f"the COPY ended inside a row ({len(held)} bytes left, no trailer)")

    def _read_header(self) -> bool:
        if len(self._pending) < _HEADER:
            return False
        if bytes(self._pending[: len(SIGNATURE)]) != SIGNATURE:
            raise BadCopy("not a binary COPY (no PGCOPY signature)")
        flags, extension = struct.unpack_from(">Ii", self._pending, len(SIGNATURE))
        if flags & _INCOMPATIBLE_FLAGS:
            raise BadCopy(f"binary COPY flags {flags:#x}: a format this reader does not know")
        if extension < 0:
            raise BadCopy(f"binary COPY header extension of {extension} bytes")
        if len(self._pending) < _HEADER + extension:
            return False
        del self._pending[: _HEADER + extension]
        self._header_read = True
        return True
