"""The binary COPY reader (metadata/pgcopy.py), sans-IO: the stream whole, byte by byte, in
blocks of every size, and every way it can be wrong.  The bytes are built here with ``struct``
from the format's description, not with the reader's own numpy layout."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from thinblock.metadata.pgcopy import SIGNATURE, BadCopy, Int8CopyReader

ROWS = [(1, 0, 7, 3), (1, 5, 7, 4), (2, 2**40 + 5, 9, 2**62), (3, -1, 0, 123456789)]


def header(flags: int = 0, extension: bytes = b"") -> bytes:
    return SIGNATURE + struct.pack(">Ii", flags, len(extension)) + extension


def row(values: tuple[int, ...], *, lengths: tuple[int, ...] | None = None) -> bytes:
    out = struct.pack(">h", len(values))
    for i, v in enumerate(values):
        length = 8 if lengths is None else lengths[i]
        out += struct.pack(">i", length) + (struct.pack(">q", v) if length == 8 else b"\0" * max(length, 0))
    return out


TRAILER = struct.pack(">h", -1)


def stream(rows: list[tuple[int, ...]] = ROWS, **kw: object) -> bytes:
    return header(**kw) + b"".join(row(r) for r in rows) + TRAILER  # type: ignore[arg-type]


def read(data: bytes, rows: int, step: int | None = None, block: int = 1) -> np.ndarray:
    reader = Int8CopyReader(rows, 4, block=block)
    step = step or len(data) or 1
    for i in range(0, len(data), step):
        reader.feed(memoryview(data)[i : i + step])
    return reader.finish()


def test_whole_stream() -> None:
    assert read(stream(), len(ROWS), block=1 << 20).tolist() == [list(r) for r in ROWS]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 49, 50, 51, 64])
def test_byte_by_byte_and_every_block_size(step: int) -> None:
    assert read(stream(), len(ROWS), step=step).tolist() == [list(r) for r in ROWS]


def test_header_extension_is_skipped_and_compatible_flags_ignored() -> None:
    data = stream(flags=1 << 20, extension=b"future!")
    assert read(data, len(ROWS), step=1).tolist() == [list(r) for r in ROWS]


def test_no_rows() -> None:
    assert read(stream([]), 0, step=1).shape == (0, 4)


def test_many_rows_parsed_in_blocks() -> None:
    rng = np.random.default_rng(1)
    rows = [tuple(int(x) for x in r) for r in rng.integers(-(2**62), 2**62, size=(5000, 4))]
    data = stream(rows)
    got = read(data, len(rows), step=4096, block=64 * 1024)
    assert got.tolist() == [list(r) for r in rows]


@pytest.mark.parametrize(
    ("data", "rows", "why"),
    [
        (b"", 0, "no COPY header"),
        (SIGNATURE[:5], 0, "inside its header"),
        (b"PGCOPZ\n\xff\r\n\x00" + bytes(8) + TRAILER, 0, "no PGCOPY signature"),
        (stream(flags=1 << 16), len(ROWS), "flags"),  # OIDs included
        (stream(flags=1), len(ROWS), "flags"),  # a reserved, incompatible bit
        (header() + row(ROWS[0]), 1, "no trailer"),  # cut before the trailer
        (header() + row(ROWS[0])[:-3], 1, "inside a row"),  # cut inside a row
        (stream() + b"x", len(ROWS), "after the end"),  # trailing data, short
        (stream() + row(ROWS[0]), len(ROWS), "after the end"),  # trailing data: a whole row
        (stream(), len(ROWS) + 1, "counted"),  # fewer rows than counted
        (stream(), len(ROWS) - 1, "more rows"),  # more rows than counted
        (header() + row((1, 2, 3)) + TRAILER, 1, "with 3 fields"),
        (header() + row((1, 2, 3, 4), lengths=(8, -1, 8, 8))[:-8] + TRAILER, 1, "NULL"),
        (header() + row((1, 2, 3, 4), lengths=(8, 8, 4, 8)) + bytes(4) + TRAILER, 1, "8-byte"),
        # a short row in the middle: the rows after it are not read misaligned
        (header() + row((1, 2, 3, 4), lengths=(8, -1, 8, 8))[:-8] + row(ROWS[0]) * 3 + TRAILER, 4, "NULL"),
    ],
)
@pytest.mark.parametrize("step", [None, 1])
def test_bad_streams_are_refused(data: bytes, rows: int, why: str, step: int | None) -> None:
    with pytest.raises(BadCopy, match=why):
        read(data, rows, step=step)


def test_feeding_after_the_end_is_refused() -> None:
    reader = Int8CopyReader(len(ROWS), 4)
    reader.feed(stream())
    reader.finish()
    with pytest.raises(BadCopy, match="after the end"):
        reader.feed(b"\0")
