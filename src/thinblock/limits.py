"""Space settings that contradict each other are refused, each with one line saying which.

A pool's growth settings and a volume's allocation warning and limit are checked together
whenever one of them is set, against each other and against what exists already:

* a warning above its limit (it would never be seen before the limit refuses writes);
* a volume allocation limit smaller than one region (nothing could ever be written);
* a pool growth limit below its growth increment, or below the capacity the pool already has.

A volume larger than its pool could ever grow to is *not* refused: that is thin provisioning.
``status`` and ``pool list`` show the overcommit ratio instead (virtual sizes over the pool's
capacity, or its growth limit when it has one).
"""

from __future__ import annotations

from .errors import InvalidArgument
from .units import Limit, format_size


def check_pool_growth(
    name: str, *, increment: int, warning: int | None, limit: int | None, capacity: int
) -> None:
    """InvalidArgument when the pool's growth settings contradict each other or its capacity."""
    if warning is not None and limit is not None and warning > limit:
        raise InvalidArgument(
            f"pool '{name}': growth warning {format_size(warning)} is above the growth limit "
            f"{format_size(limit)}; it would never be seen"
        )
    if limit is not None and limit < increment:
        raise InvalidArgument(
            f"pool '{name}': growth limit {format_size(limit)} is below the growth increment "
            f"{format_size(increment)}; lower the increment or raise the limit"
        )
    if limit is not None and limit < capacity:
        raise InvalidArgument(
            f"pool '{name}': growth limit {format_size(limit)} is below the pool's current size "
            f"{format_size(capacity)}; compact the pool first, or raise the limit"
        )


def check_vv_limits(
    name: str, *, size: int, region_size: int, warning: Limit | None, limit: Limit | None
) -> None:
    """InvalidArgument when the volume's allocation warning and limit contradict each other."""
    if limit is not None and limit.resolve(size) < region_size:
        raise InvalidArgument(
            f"volume '{name}': allocation limit {_limit_text(limit, size)} is smaller than one region "
            f"({format_size(region_size)}); nothing could be written"
        )
    if warning is not None and limit is not None and warning.resolve(size) > limit.resolve(size):
        raise InvalidArgument(
            f"volume '{name}': allocation warning {_limit_text(warning, size)} is above the allocation "
            f"limit {_limit_text(limit, size)}; it would never be seen"
        )


def check_snapshot_limits(name: str, *, size: int, warning: Limit | None, limit: Limit | None) -> None:
    """InvalidArgument when the volume's snapshot space warning is above its limit."""
    if warning is not None and limit is not None and warning.resolve(size) > limit.resolve(size):
        raise InvalidArgument(
            f"volume '{name}': snapshot space warning {_limit_text(warning, size)} is above the snapshot"
            f" space limit {_limit_text(limit, size)}; it would never be seen"
        )


def overcommit_ratio(virtual: int, capacity: int, growth_limit: int | None) -> float | None:
    """Virtual sizes over what the pool can hold at most (its growth limit, else its capacity);
    None when that is zero (a pool with no LD and no limit can grow as far as the PDs go)."""
    ceiling = growth_limit if growth_limit is not None else capacity
    return round(virtual / ceiling, 2) if ceiling else None


def _limit_text(limit: Limit, size: int) -> str:
    return str(limit) if limit.percent is None else f"{limit} ({format_size(limit.resolve(size))})"
