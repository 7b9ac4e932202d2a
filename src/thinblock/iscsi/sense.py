"""SCSI sense data (SPC-4 4.5.3: fixed format) and the exception that carries it."""

from __future__ import annotations

from .constants import Asc, SenseKey


def fixed_sense(
    key: SenseKey, asc: int, *, information: int | None = None, field: int | None = None
) -> bytes:
    """Fixed-format sense data (response code 70h), 18 bytes.  ``field`` is the byte of the
    CDB at fault (sense-key specific: SKSV=1, C/D=1)."""
    sense = bytearray(18)
    sense[0] = 0x70
    sense[2] = int(key) & 0x0F
    if information is not None:
        sense[0] |= 0x80  # VALID
        sense[3:7] = (information & 0xFFFFFFFF).to_bytes(4, "big")
    sense[7] = 10  # additional sense length
    sense[12] = (asc >> 8) & 0xFF
    sense[13] = asc & 0xFF
    if field is not None:
        sense[15] = 0x80 | 0x40  # SKSV, C/D: the error is in the CDB
        sense[16:18] = field.to_bytes(2, "big")
    return bytes(sense)


class CheckCondition(Exception):
    """A command ends with CHECK CONDITION and this sense."""

    def __init__(
        self,
        key: SenseKey,
        asc: int,
        *,
        field: int | None = None,
        information: int | None = None,
        wanted: int = 0,
    ) -> None:
        super().__init__(f"{key.name} {asc:04x}")
        self.wanted = wanted  # bytes the command meant to move (for the residual count)
        self.key = key
        self.asc = asc
        self.sense = fixed_sense(key, asc, field=field, information=information)


def illegal(asc: int = Asc.INVALID_FIELD_IN_CDB, field: int | None = None) -> CheckCondition:
    return CheckCondition(SenseKey.ILLEGAL_REQUEST, asc, field=field)
