"""thinblock.physical: physical disks (files or block devices) carved into chunklets."""

from .pd import MIN_CHUNKLET, MIN_TINY_CHUNKLET, PDRange, PhysicalDisk

__all__ = ["MIN_CHUNKLET", "MIN_TINY_CHUNKLET", "PDRange", "PhysicalDisk"]
