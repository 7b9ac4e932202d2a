"""Numbers of the NBD protocol (doc/proto.md of the NetworkBlockDevice/nbd repository).

One enum per number family, so that a value can never be mistaken for one of
another family.  Values are as they travel on the wire (big-endian integers).
"""

from __future__ import annotations

import enum

# Strings (export names, descriptions, error messages, context names): "MUST be no
# longer than 4096 bytes" and "MUST NOT contain NUL characters".
MAX_STRING_LENGTH = 4096


@enum.unique
class Magic(enum.IntEnum):
    """Magic numbers that start messages."""

    NBDMAGIC = 0x4E42444D41474943  # 'NBDMAGIC', first 8 bytes the server sends
    IHAVEOPT = 0x49484156454F5054  # 'IHAVEOPT', newstyle handshake and every option request
    OPTION_REPLY = 0x0003E889045565A9  # every fixed-newstyle option reply
    REQUEST = 0x25609513  # transmission request
    SIMPLE_REPLY = 0x67446698
    STRUCTURED_REPLY = 0x668E33EF


@enum.unique
class HandshakeFlags(enum.IntFlag):
    """16 bits the server sends after the magics."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


@enum.unique
class ClientFlags(enum.IntFlag):
    """32 bits the client answers with; any other bit set means "drop the connection"."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


@enum.unique
class Option(enum.IntEnum):
    """Option types of the handshake phase."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11  # not supported here: answered with ERR_UNSUP


_REP_ERROR = 1 << 31


@enum.unique
class OptionReply(enum.IntEnum):
    """Reply types of fixed-newstyle option replies; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERROR + 1
    ERR_POLICY = _REP_ERROR + 2
    ERR_INVALID = _REP_ERROR + 3
    ERR_PLATFORM = _REP_ERROR + 4
    ERR_TLS_REQD = _REP_ERROR + 5
    ERR_UNKNOWN = _REP_ERROR + 6
    ERR_SHUTDOWN = _REP_ERROR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERROR + 8
    ERR_TOO_BIG = _REP_ERROR + 9
    ERR_EXT_HEADER_REQD = _REP_ERROR + 10

    @property
    def is_error(self) -> bool:
        return bool(self.value & _REP_ERROR)


@enum.unique
class InfoType(enum.IntEnum):
    """Information types of NBD_REP_INFO (answers to NBD_OPT_INFO / NBD_OPT_GO)."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


@enum.unique
class TransmissionFlags(enum.IntFlag):
    """16 bits describing an export, sent with its size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STAT_PAYLOAD = 1 << 12


@enum.unique
class Command(enum.IntEnum):
    """Request types of the transmission phase."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8  # experimental extension, not supported


@enum.unique
class CommandFlags(enum.IntFlag):
    """16 bits of flags in every request."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # extended headers only


@enum.unique
class ReplyFlags(enum.IntFlag):
    """16 bits of flags in every structured reply chunk."""

    DONE = 1 << 0


_CHUNK_ERROR = 1 << 15


@enum.unique
class ReplyType(enum.IntEnum):
    """Types of structured reply chunks; error chunks have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = _CHUNK_ERROR + 1
    ERROR_OFFSET = _CHUNK_ERROR + 2


@enum.unique
class Errno(enum.IntEnum):
    """The only error values allowed on the wire."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


@enum.unique
class BlockStatusFlags(enum.IntFlag):
    """Status flags of the base:allocation metadata context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"

# qemu's namespace (registered in the NBD spec; qemu's docs/interop/nbd.rst): one context per dirty
# bitmap, ``qemu:dirty-bitmap:NAME``, whose only flag is bit 0, NBD_STATE_DIRTY.  During
# NBD_OPT_LIST_META_CONTEXT ``qemu:`` and ``qemu:dirty-bitmap:`` list every dirty bitmap.
QEMU_NAMESPACE = "qemu:"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"


@enum.unique
class DirtyBitmapFlags(enum.IntFlag):
    """Status flags of a qemu:dirty-bitmap:NAME metadata context."""

    DIRTY = 1 << 0
