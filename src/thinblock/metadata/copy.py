"""``thinblock metadata copy``: a stopped node's metadata into another store (moving up from the
embedded SQLite store to PostgreSQL), checked before and after.

The steps, each of which refuses with one line and changes nothing when it fails:

1. The source's data directory is locked for the whole copy (``datalock``): a running daemon
   holds that lock, so a live store is never copied, and no daemon can start on it meanwhile.
2. The source must pass the store check (``check.check_store``): a damaged store is not spread.
3. The target must be empty (``write_image`` checks it inside its own transaction).
4. Everything is written in one transaction, ids kept: PDs, pools, LDs and chunklets, VVs, the
   region map, alerts, and the ``meta`` keys (the data directory's id and store generation that
   the PD headers are checked against, the clean mark).  Leases are not copied.
5. The target must pass the same check, hold the same number of records of every kind, and the
   same map and meta as the source.

The source is left as it was: the copy is a copy.  Starting a daemon on the old store after the
new one served writes is refused by the PD headers (its generation is behind theirs:
``pdheaders.StoreBehindData``)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..datalock import lock_data_dir
from ..errors import Conflict, MetadataCorrupt
from . import open_store, sqlite_dir, store_kind
from .check import check_store
from .store import MetadataStore


@dataclass
class CopyReport:
    source: str  # URLs without passwords
    target: str
    counts: dict[str, int]  # records of each kind, the same on both sides


class CopyRefused(Conflict):
    """The copy was refused (nothing written), or the target failed its check after the copy
    (the message says so: drop the target's tables before trying again)."""


def copy_store(source_url: str, target_url: str, data_dir: str | Path | None = None) -> CopyReport:
    """Copy the store at ``source_url`` into the empty store at ``target_url``; CopyRefused
    with one line saying why when it cannot."""
    directories: list[Path] = []  # to lock: the source's data directory, a SQLite target's
    if store_kind(source_url) == "sqlite":
        directories.append(sqlite_dir(source_url, data_dir))
        if not directories[0].is_dir():
            raise CopyRefused(f"no data directory at {directories[0]}")
    elif data_dir is not None:
        directories.append(Path(data_dir))
    if store_kind(target_url) == "sqlite":
        target_dir = sqlite_dir(target_url, data_dir)
        if any(target_dir.resolve() == d.resolve() for d in directories):
            raise CopyRefused(f"source and target are the same store ({target_dir})")
        if target_dir.is_dir():
            directories.append(target_dir)
    lock_fds: list[int] = []
    try:
        for directory in directories:
            try:
                lock_fds.append(lock_data_dir(directory))
            except Conflict as exc:
                raise CopyRefused(f"{exc}: stop the daemon before copying its metadata") from None
        try:
            source = open_store(source_url, data_dir, create=False)
        except MetadataCorrupt as exc:
            raise CopyRefused(f"source: {exc}") from None
        try:
            return _copy_from(source, target_url, data_dir)
        finally:
            source.close()
    finally:
        for fd in lock_fds:
            os.close(fd)


def _copy_from(source: MetadataStore, target_url: str, data_dir: str | Path | None) -> CopyReport:
    problems = check_store(source)
    if problems:
        raise CopyRefused(
            f"source {source.url} fails its check ({len(problems)} problem(s)): {problems[0]};"
            " run thinblock check on it"
        )
    image = source.load_image()
    counts = source.counts()
    target = open_store(target_url, data_dir, create=True)
    try:
        if target.url == source.url:
            raise CopyRefused(f"source and target are the same store ({source.url})")
        after = "; the target holds the copy: empty it before trying again"
        if not target.is_empty():  # said here plainly; write_image checks again inside its transaction
            held = ", ".join(f"{n} {table}" for table, n in target.counts().items() if n)
            raise CopyRefused(f"target {target.url} is not empty ({held}): copy only into an empty store")
        target.write_image(image)
        problems = check_store(target)
        if problems:
            raise CopyRefused(
                f"target {target.url} fails its check after the copy ({len(problems)} problem(s)):"
                f" {problems[0]}{after}"
            )
        copied = target.counts()
        if copied != counts:
            differ = ", ".join(
                f"{k} {counts.get(k)} -> {copied.get(k)}" for k in counts if counts[k] != copied.get(k)
            )
            raise CopyRefused(
                f"target {target.url} holds other counts than the source after the copy: {differ}{after}"
            )
        if not _same_map(image.map, target.map_array()) or target.load_meta() != image.meta:
            raise CopyRefused(f"target {target.url} holds another region map or meta than the source{after}")
        return CopyReport(source.url, target.url, copied)
    finally:
        target.close()


def _same_map(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    if not len(a):
        return True
    return bool(np.array_equal(a[np.lexsort(a.T[::-1])], b[np.lexsort(b.T[::-1])]))
