"""Parity arithmetic and scratch space for the RAID layer.

Parity is XOR across the columns of a stripe, done by numpy over whole ranges at once
("Parity arithmetic uses numpy (vectorised XOR), not Python loops", issue 2).

The hot paths must not allocate per request, so the RAID code borrows scratch arrays
from here.  They are per thread (the engine may zero or flush an LD from a worker thread
while the loop thread writes another) and grow on demand to the largest size asked for.
Each buffer has a fixed purpose (a "slot"): a caller never asks for a slot it already
holds a view of, so views never alias.
"""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt

Bytes = npt.NDArray[np.uint8]

# Scratch slots.
OLD = 0  # old data of a read-modify-write; reconstruct-write matrix
PARITY = 1  # parity being computed
REBUILD = 2  # rebuild / resync source matrix
REBUILD_OUT = 3  # rebuild / resync result
_SLOTS = 4


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: list[Bytes] = [np.empty(0, np.uint8) for _ in range(_SLOTS)]


_scratch = _Scratch()


def scratch(slot: int, nbytes: int) -> Bytes:
    """A 1-D uint8 array of ``nbytes`` owned by this thread (contents undefined)."""
    buf = _scratch.buffers[slot]
    if len(buf) < nbytes:
        buf = np.empty(max(nbytes, 2 * len(buf)), np.uint8)
        _scratch.buffers[slot] = buf
    return buf[:nbytes]


def scratch_matrix(slot: int, rows: int, cols: int) -> Bytes:
    """A C-contiguous ``rows x cols`` uint8 matrix from scratch: each row is a contiguous
    buffer that ``preadv`` can fill directly."""
    return scratch(slot, rows * cols).reshape(rows, cols)


def as_array(buf: bytes | bytearray | memoryview) -> Bytes:
    """A zero-copy uint8 view of a byte buffer (writable when the buffer is)."""
    return np.frombuffer(buf, np.uint8)


def view(arr: Bytes) -> memoryview:
    """A byte memoryview of a contiguous array, for preadv/pwrite (no copy)."""
    assert arr.flags.c_contiguous
    return arr.data.cast("B") if arr.ndim != 1 else arr.data


def xor_rows(matrix: Bytes, out: Bytes) -> None:
    """``out = matrix[0] ^ matrix[1] ^ ...`` in one vectorised reduction."""
    np.bitwise_xor.reduce(matrix, axis=0, out=out)


def xor_into(target: Bytes, *sources: Bytes) -> None:
    """``target ^= source`` for each source, in place."""
    for src in sources:
        np.bitwise_xor(target, src, out=target)


def stripe_parity(data: Bytes, stripes: int, data_columns: int, step: int) -> Bytes:
    """Parity of ``stripes`` consecutive full stripes laid out back to back in ``data``
    (stripe-major, then data column, then byte): returns ``stripes x step``."""
    return np.bitwise_xor.reduce(data.reshape(stripes, data_columns, step), axis=1)
