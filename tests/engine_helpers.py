"""Building engines for tests: tiny PDs, chunklets and regions, real files, real SQLite."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from thinblock.engine import Engine, EngineOptions
from thinblock.errors import MediumError
from thinblock.logical import LogicalDisk
from thinblock.pool.pool import REGION_BITS, REGION_MASK
from thinblock.units import KiB, MiB

CHUNKLET = 64 * KiB
REGION = 16 * KiB
STEP = 4 * KiB


async def make_engine(
    data_dir: Path,
    *,
    pds: int = 4,
    pd_size: int = 4 * MiB,
    chunklet: int = CHUNKLET,
    options: EngineOptions | None = None,
) -> Engine:
    engine = await Engine.open(
        data_dir, options or EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001)
    )
    for i in range(pds):
        await engine.add_pd(data_dir / f"pd{i}.img", size=pd_size, chunklet_size=chunklet)
    return engine


async def reopen(engine: Engine, options: EngineOptions | None = None) -> Engine:
    data_dir = engine.data_dir
    await engine.close()
    return await Engine.open(
        data_dir, options or EngineOptions(allow_tiny_chunklets=True, destage_delay=0.001)
    )


def pattern(seed: int, length: int) -> bytes:
    """Deterministic, non-zero, position-dependent bytes."""
    block = bytes(((seed * 131 + i * 7) % 251) + 1 for i in range(256))
    return (block * (length // 256 + 1))[:length]


def fail_writes_to_region(engine: Engine, vv: str, region: int) -> Callable[[], int]:
    """Make the LD holding ``vv``'s region fail writes into that region only; returns a counter
    of the failed writes."""
    key = engine.vvs[vv].map.get(region)
    ld: LogicalDisk = engine.lds[key >> REGION_BITS]
    lo = (key & REGION_MASK) * REGION
    real_write = ld.write
    failed = [0]

    def write(offset: int, data: bytes) -> None:
        if lo <= offset < lo + REGION:
            failed[0] += 1
            raise MediumError(f"LD {ld.id}: simulated write error at {offset}")
        real_write(offset, data)

    ld.write = write  # type: ignore[method-assign]
    return lambda: failed[0]
