"""The exceptions every layer raises, and what a front end turns them into.

Each maps to one NBD errno and one HTTP status at the edges (nbd/, api/); inside
the engine they carry a clear message naming the object concerned.

Running out of space is an *expected* result: the pool returns a ``SpaceShortage``
value (see pool/), and only the volume's public API turns it into ``OutOfSpace``.
Corruption is an error: ``MetadataCorrupt`` refuses to open a store.
"""

from __future__ import annotations


class ThinblockError(Exception):
    """Base of every error thinblock raises on purpose."""

    http_status = 500


class InvalidArgument(ThinblockError, ValueError):
    """Bad input: out-of-range offset, misaligned size, negative size, bad name... Changes nothing."""

    http_status = 400


class NotFound(ThinblockError):
    """An unknown PD id, pool, LD or VV name, alert id."""

    http_status = 404


class AlreadyExists(ThinblockError):
    """A duplicate name (pool, VV) or a PD path already in use."""

    http_status = 409


class Conflict(ThinblockError):
    """The operation is not possible in the object's current state (a pool with VVs, a PD in use)."""

    http_status = 409


class OutOfSpace(ThinblockError):
    """A write needed a new region and none may be had: VV allocation limit, pool growth
    limit, or no PD with free chunklets.  Writes to regions already assigned still succeed.

    ``reason`` is the alert kind that was raised (vv-allocation-limit, pool-growth-limit,
    pool-out-of-chunklets)."""

    http_status = 507

    def __init__(self, message: str, reason: str = "out-of-space") -> None:
        super().__init__(message)
        self.reason = reason


class VolumeGone(ThinblockError):
    """I/O on a volume that was deleted under its client (``vv delete --force``): an error,
    never the zeros its released regions would read."""

    http_status = 410


class HostOutOfSpace(OutOfSpace):
    """A PD's file system (the host's, under a PD file) is full: a space condition, not a disk
    failure.  The write fails with ENOSPC, the PD stays in service (issue 10 case 5)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "pd-host-full")


class MediumError(ThinblockError):
    """Unrecoverable I/O error: the data cannot be read or written (too many failed PDs)."""

    http_status = 500


class ReadOnlyDevice(ThinblockError):
    """A write was sent to a device that refuses writes (the zero LD)."""

    http_status = 500


class MetadataCorrupt(ThinblockError):
    """The metadata store failed its check on open.  Nothing is repaired silently."""

    http_status = 500


class MetadataStoreFull(OutOfSpace):
    """The metadata store's file system (or database) has no room for a transaction: the
    change was not made.  Writes needing a new region fail with ENOSPC; the node goes on
    once space returns (nothing is retried behind the caller's back)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "metadata-store-full")


class MetadataUnavailable(MediumError):
    """The metadata store cannot be reached (a PostgreSQL server down or cut off): the change
    was not made.  Writes needing a new region fail with EIO; reads and overwrites go on."""

    http_status = 503


class LeaseLost(MediumError):
    """This node no longer holds the lease its store is bound to (another holder took it, or it
    expired): the metadata write was refused inside its own transaction and changed nothing."""

    http_status = 503


class Fenced(MediumError):
    """This node may not write now: its lease is lost, or not known to be held (fence.py).  The
    write was not made; nothing is failed or dropped because of it."""

    http_status = 503


class SlowZero(ThinblockError):
    """A FAST_ZERO write-zeroes request could not be done faster than writing zeros (NBD_ENOTSUP)."""

    http_status = 400
