"""The map check: per volume, a sum of its map rows that the store keeps beside them.

Why: a bit flipped on the disk in one map row's LD address (drill 6,
tests/drills/test_metadata_damage.py) makes the row name another LD region, and the volume
would serve that region's data.  The counters (rows per VV, rows per LD) do not see it: the
row is still there, in the same LD.  Something must hold each row's address a second time.
Until schema 5 that was a second SQLite index keyed like the map (``vv_map_check``: SQLite's
``PRAGMA integrity_check`` holds every row to its index entry), which doubled the cost of every
map row written -- most of a snapshot's store transaction, a million rows copied (bench/README.md,
the snapshot section).  This sum does the same job for the check at no cost to a snapshot:

    map_check(VV) = sum over the VV's rows of term(vv_region, ld_id, ld_region)
    term(r, l, x) = ((r mod P) * A + (l mod P) * B + x mod P) mod P

It leaves the VV id out, so a snapshot's or clone's check is its source's, copied with one
value (its rows are the source's under another VV id), and a revert's the snapshot's; a row
moved to another VV is found by the counters (and both sums).  Every store statement that
changes the map changes the sum in the same transaction (added rows add their terms, removed
ones take them, a switch takes the old address's and adds the new one's); the check
(metadata/check.py) adds the terms of the rows it reads and compares.  A change of one row's
region or LD region by d, with d not a multiple of P, always changes the sum (P is prime and
A, B < P); several changes that cancel out exactly pass, as two rows swapped whole would have
passed the index.  The sum is exact (no modulo: the statements that keep it add and take terms,
and a "%" in a statement shared with PostgreSQL would be a placeholder to psycopg); every term is
below 2^30 and every product in it below 2^60, and a sum of up to 2^32 terms stays below 2^62, so
no SQL integer overflows (SQLite would turn it into a float).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

P = 1_000_000_007  # prime, < 2^30
A = 1_000_003  # < P
B = 998_244_353  # < P


def term_sql(vv_region: str = "vv_region", ld_id: str = "ld_id", ld_region: str = "ld_region") -> str:
    """The term of one row as an SQL expression over its columns (SQLite and PostgreSQL)."""
    return f"((({vv_region}) % {P}) * {A} + (({ld_id}) % {P}) * {B} + ({ld_region}) % {P}) % {P}"


def term(vv_region: int, ld_id: int, ld_region: int) -> int:
    return ((vv_region % P) * A + (ld_id % P) * B + ld_region % P) % P


def sums_by_vv(m: np.ndarray) -> dict[int, int]:
    """{vv_id: map check} of an (N, 4) map array (vv_id, vv_region, ld_id, ld_region)."""
    if not len(m):
        return {}
    terms = ((m[:, 1] % P) * A + (m[:, 2] % P) * B + m[:, 3] % P) % P
    ids, inverse = np.unique(m[:, 0], return_inverse=True)
    totals = np.zeros(len(ids), dtype=np.int64)
    np.add.at(totals, inverse, terms)  # < 2^62: int64 holds it
    return {int(k): int(t) for k, t in zip(ids, totals, strict=True)}


def added_by_vv(rows: Iterable[tuple[int, int, int, int]]) -> dict[int, int]:
    """{vv_id: what its map check gains} for (vv_id, vv_region, ld_id, ld_region) rows added."""
    sums: dict[int, int] = {}
    for vv_id, vv_region, ld_id, ld_region in rows:
        sums[vv_id] = sums.get(vv_id, 0) + term(vv_region, ld_id, ld_region)
    return sums
