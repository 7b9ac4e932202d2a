"""thinblock.logical: RAID logical disks over chunklets, and the zero LD."""

from .raid import (
    MAX_STEP,
    MIN_STEP,
    Chunklet,
    LogicalDisk,
    RaidLevel,
    RebuildJob,
    usable_per_row,
    validate_policy,
)
from .zero import ZERO_LD, ZERO_LD_ID, ZeroLD

__all__ = [
    "MAX_STEP",
    "MIN_STEP",
    "ZERO_LD",
    "ZERO_LD_ID",
    "Chunklet",
    "LogicalDisk",
    "RaidLevel",
    "RebuildJob",
    "ZeroLD",
    "usable_per_row",
    "validate_policy",
]
