"""Which chunklets of which PDs are free, and picking them for a new RAID row."""

from __future__ import annotations

from ..logical.raid import Chunklet
from ..model import PDHealth
from ..physical.pd import PhysicalDisk


class ChunkletAllocator:
    """Free/used chunklets of every PD (in memory; the store's ld_chunklets table is the truth)."""

    def __init__(self) -> None:
        self.pds: dict[int, PhysicalDisk] = {}
        self._used: dict[int, bytearray] = {}
        self._free: dict[int, int] = {}
        # 1: a free chunklet known to read zeros *durably* (a PD file this process created,
        # never used since).  A new LD must zero (punch) and fsync its chunklets before it
        # offers a region, and that fsync writes back every dirty page of the PD file: under
        # a stream of fresh writes, seconds during which every writer needing a region waits.
        # Known-zero chunklets skip it.  Anything released, and every chunklet of a PD found
        # on open, is unknown (the zeroing path).
        self._zeroed: dict[int, bytearray] = {}

    def add_pd(self, pd: PhysicalDisk, *, zeroed: bool = False) -> None:
        self.pds[pd.id] = pd
        self._used[pd.id] = bytearray(pd.chunklet_count)
        self._free[pd.id] = pd.chunklet_count
        self._zeroed[pd.id] = bytearray(b"\x01" * pd.chunklet_count if zeroed else pd.chunklet_count)

    def remove_pd(self, pd_id: int) -> None:
        assert self._free[pd_id] == len(self._used[pd_id]), "PD still has used chunklets"
        del self.pds[pd_id], self._used[pd_id], self._free[pd_id], self._zeroed[pd_id]

    def take_zeroed(self, chunklet: Chunklet) -> bool:
        """Whether a just-picked chunklet is known to read zeros durably; it is not any more
        once taken (its LD writes it)."""
        flags = self._zeroed[chunklet.pd.id]
        known = bool(flags[chunklet.index])
        flags[chunklet.index] = 0
        return known

    def mark_used(self, pd_id: int, index: int) -> None:
        used = self._used[pd_id]
        assert not used[index], f"chunklet {index} of PD {pd_id} used twice"
        used[index] = 1
        self._free[pd_id] -= 1

    def release(self, pd_id: int, index: int) -> None:
        used = self._used.get(pd_id)
        if used is None:  # PD removed meanwhile
            return
        assert used[index], f"chunklet {index} of PD {pd_id} released twice"
        used[index] = 0
        self._free[pd_id] += 1
        self._zeroed[pd_id][index] = 0  # may hold data now

    def used_count(self, pd_id: int) -> int:
        return len(self._used[pd_id]) - self._free[pd_id]

    def free_count(self, pd_id: int) -> int:
        return self._free[pd_id]

    def pick(
        self, count: int, *, chunklet_size: int, exclude: set[int] | None = None
    ) -> list[Chunklet] | None:
        """``count`` free chunklets of ``chunklet_size`` on *distinct* healthy PDs, taken from the PDs with
        the most free chunklets (spreading load); marked used.  None when not possible."""
        candidates = [
            pd
            for pd in self.pds.values()
            if pd.health == PDHealth.NORMAL
            and pd.chunklet_size == chunklet_size
            and self._free[pd.id] > 0
            and (exclude is None or pd.id not in exclude)
        ]
        if len(candidates) < count:
            return None
        candidates.sort(key=lambda pd: (-self._free[pd.id], pd.id))
        picked: list[Chunklet] = []
        for pd in candidates[:count]:
            index = self._used[pd.id].find(0)
            assert index >= 0
            self.mark_used(pd.id, index)
            picked.append(Chunklet(pd, index))
        return picked

    def chunklet_sizes(self) -> set[int]:
        return {pd.chunklet_size for pd in self.pds.values()}
