"""Sizes with units, as administrators type them: 512, 512K, 16MiB, 1G, 2TiB, 1EiB, 80%.

Binary multiples throughout (K = KiB = 1024), as storage tools conventionally do.  ``10GB`` is
refused with a hint rather than read either way: an SI gigabyte is 7% less than a GiB, and a
volume silently 7% off its intended size is the kind of surprise a storage tool must not spring.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidArgument

KiB = 1024
MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
PiB = 1024**5
EiB = 1024**6

_UNITS = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB, "P": PiB, "E": EiB}
_SIZE_RE = re.compile(r"^\s*(-?)(\d+(?:\.\d+)?)\s*([KMGTPE]?)(I?B)?\s*$", re.IGNORECASE)
SIZE_EXAMPLES = "examples: 4096, 512K, 16MiB, 1G, 2TiB"


def parse_size(text: str | int) -> int:
    """Parse ``"16MiB"`` -> 16777216.  Raises InvalidArgument on anything else."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(f"not a size: {text!r} ({SIZE_EXAMPLES})")
    sign, number, unit, suffix = m.group(1), m.group(2), m.group(3).upper(), (m.group(4) or "").upper()
    if sign:
        raise InvalidArgument(f"a size cannot be negative: {text.strip()!r}")
    if unit and suffix == "B":
        raise InvalidArgument(
            f"{text.strip()!r} is ambiguous: write {number}{unit}iB for binary units (1{unit}iB = "
            f"{_UNITS[unit]} bytes, what thinblock means by {number}{unit}), or give the SI size in bytes"
        )
    value = float(number) * _UNITS[unit] if "." in number else int(number) * _UNITS[unit]
    if value != int(value):
        raise InvalidArgument(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(n: int | None) -> str:
    """4294967296 -> '4 GiB'; 1536 -> '1.5 KiB'; None -> '-'."""
    if n is None:
        return "-"
    for unit, mult in (("EiB", EiB), ("PiB", PiB), ("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= mult:
            v = n / mult
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


@dataclass(frozen=True, slots=True)
class Limit:
    """A VV allocation warning or limit: an absolute byte count or a percentage of the
    virtual size (kept relative, so growing the VV moves the limit with it)."""

    bytes: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.bytes is None) == (self.percent is None):
            raise InvalidArgument("a limit is either bytes or a percentage")
        if self.bytes is not None and self.bytes <= 0:
            raise InvalidArgument(f"a limit must be positive, not {self.bytes}")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise InvalidArgument(f"a percentage limit must be in (0, 100], not {self.percent}")

    @classmethod
    def parse(cls, text: str | int) -> Limit:
        """``"80%"`` -> Limit(percent=80); ``"10G"`` or ``10737418240`` -> Limit(bytes=...)."""
        if isinstance(text, str) and text.strip().endswith("%"):
            try:
                return cls(percent=float(text.strip()[:-1]))
            except ValueError:
                raise InvalidArgument(f"not a percentage: {text!r}") from None
        return cls(bytes=parse_size(text))

    def resolve(self, virtual_size: int) -> int:
        """The limit in bytes for a VV of ``virtual_size``."""
        if self.bytes is not None:
            return self.bytes
        assert self.percent is not None
        return int(virtual_size * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else format_size(self.bytes)


_DURATION_UNITS = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))


def format_duration(seconds: float, parts: int = 2) -> str:
    """Whole seconds in at most ``parts`` units, from the largest one that is not zero:
    ``3d 4h``, ``2h 5m``, ``4m 10s``, ``12s`` (``parts=3``: ``3d 4h 0m``, ``2h 5m 7s``)."""
    left = int(seconds)
    shown: list[str] = []
    for name, size in _DURATION_UNITS:
        value, left = divmod(left, size)
        if (value or shown or size == 1) and len(shown) < parts:
            shown.append(f"{value}{name}")
    return " ".join(shown)
