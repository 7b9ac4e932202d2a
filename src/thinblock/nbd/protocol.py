"""Server side of the NBD protocol as a sans-IO state machine (in the style of h11).

No sockets, no asyncio: bytes go in, events come out; replies are built by
methods that return the bytes to send.  The specification is doc/proto.md of the
NetworkBlockDevice/nbd repository; comments quote the rules they implement.

Usage::

    conn = ServerConnection(list_exports=..., lookup_export=..., default_export="vol0")
    send(conn.data_to_send())                 # the greeting
    conn.receive_data(chunk)                  # or get_buffer()/buffer_updated(n); b"" = EOF
    while True:
        event = conn.next_event()
        if event is NEED_DATA: break
        ...                                   # Request -> do the I/O, then send(conn.reply_ok(event)), ...
        if isinstance(event, (ConnectionClosed, ProtocolError)): break
    send(conn.data_to_send())                 # option replies, replies to rejected requests

What the core does by itself
  * the whole fixed-newstyle negotiation (EXPORT_NAME, ABORT, LIST, INFO, GO,
    STRUCTURED_REPLY, LIST/SET_META_CONTEXT with ``base:allocation`` and the
    ``qemu:dirty-bitmap:NAME`` contexts an export names in ``ExportInfo.dirty_bitmaps``;
    anything else gets NBD_REP_ERR_UNSUP), answering from the policy it was given: a
    callable listing ``(name, description)`` pairs, a callable that returns an
    ``ExportInfo`` (or None) for a name, and the default export name;
  * validation of every request at the edge (magic, command, flags allowed for the
    command and negotiated, range within the export without 64-bit overflow, block
    size constraints, BLOCK_STATUS only with a negotiated context).  A request that
    fails validation is answered by the core (the reply is queued for
    ``data_to_send()``) and reported as ``RequestRejected``; the payload of a
    rejected WRITE is consumed so the stream stays in step;
  * bounded memory: an option larger than ``max_option_length``, a write payload
    larger than ``max_discard`` (for lengths it must refuse), too many options, or an
    unparseable stream end the connection with ``ProtocolError``.

What the application does: the I/O for each ``Request``, then one reply for it,
with ``reply_ok``, ``reply_error``, ``reply_read``, ``reply_read_extents`` or
``reply_block_status`` (one answer per context in ``meta_contexts``); replies may go out in
any order.

Receiving without a copy: ``get_buffer()`` returns a writable buffer to receive
into (``recv_into``, ``asyncio.BufferedProtocol``) and ``buffer_updated(n)`` says how
much was written.  A WRITE payload is received straight into a buffer of its own,
handed to the application as ``Request.data`` (a memoryview the core never touches
again).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .constants import (
    BASE_ALLOCATION,
    DIRTY_BITMAP_PREFIX,
    MAX_STRING_LENGTH,
    QEMU_NAMESPACE,
    BlockStatusFlags,
    ClientFlags,
    Command,
    CommandFlags,
    DirtyBitmapFlags,
    Errno,
    HandshakeFlags,
    InfoType,
    Magic,
    Option,
    OptionReply,
    ReplyFlags,
    ReplyType,
    TransmissionFlags,
)

if TYPE_CHECKING:
    from thinblock.blockdev import Capabilities

Buffer = bytes | bytearray | memoryview

# --- wire layouts (network byte order) -------------------------------------------------
_HANDSHAKE = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
_CLIENT_FLAGS = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_INFO_EXPORT = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
_INFO_BLOCK_SIZE = struct.Struct(">HIII")
_EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+ 124 zero bytes)
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, handle
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
_CHUNK_OFFSET = struct.Struct(">IHHQIQ")  # chunk header + 64-bit offset
_CHUNK_HOLE = struct.Struct(">IHHQIQI")  # chunk header + offset + hole size
_CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header + error + message length

REQUEST_SIZE = _REQUEST.size  # 28
# Plain ints for the hot path (attribute access on enum classes is comparatively slow).
_REQUEST_MAGIC = int(Magic.REQUEST)
_SIMPLE_MAGIC = int(Magic.SIMPLE_REPLY)
_STRUCTURED_MAGIC = int(Magic.STRUCTURED_REPLY)
_DONE = int(ReplyFlags.DONE)
_TYPE_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
_TYPE_OFFSET_HOLE = int(ReplyType.OFFSET_HOLE)
_CMD_WRITE = int(Command.WRITE)
_CMD_DISC = int(Command.DISC)
_CMD_FLUSH = int(Command.FLUSH)
_CMD_WRITE_ZEROES = int(Command.WRITE_ZEROES)
_CMD_BLOCK_STATUS = int(Command.BLOCK_STATUS)
_PAYLOAD_COMMANDS = frozenset({int(Command.READ), int(Command.WRITE), int(Command.CACHE)})
_OK: tuple[Errno, str] = (Errno.OK, "")
_COMMAND_READ = Command.READ
_COMMAND_WRITE = Command.WRITE
_COMMAND_BLOCK_STATUS = Command.BLOCK_STATUS
_IHAVEOPT_HIGH = Magic.IHAVEOPT >> 32
OPTION_HEADER_SIZE = _OPTION_HEADER.size  # 16
EXPORT_NAME_ZEROES = 124

U32_MAX = 0xFFFFFFFF
U64_MAX = 0xFFFFFFFFFFFFFFFF

# The metadata context id this server gives base:allocation (any nonzero opaque value); dirty
# bitmaps selected with it get the ids after it, in the order of the client's queries.
BASE_ALLOCATION_ID = 1
# "Servers SHOULD NOT send more than 2^20 extents in a single reply chunk".
MAX_DESCRIPTORS = 1 << 20

# Defaults of the policy knobs.
DEFAULT_MAX_OPTION_LENGTH = 64 * 1024  # export name + queries of the largest legal options fit
DEFAULT_MAX_OPTIONS = 4096  # options per connection before we call it a denial of service
DEFAULT_MAX_DISCARD = 64 * 1024 * 1024  # payload of a refused WRITE we still read and drop
# Negotiation runs in a small receive buffer (grown on demand for a long option), so that a
# connection that never gets past it -- idle, slow or hostile -- holds little memory; entering
# transmission it gets the large one, room for a deep pipeline of small requests per recv.
_NEGOTIATION_BUFFER = 32 * 1024
_RECEIVE_BUFFER = 256 * 1024
_MIN_FREE = 16 * 1024
_SCRATCH = 64 * 1024
# Below this size a reply's payload is joined to its header (one write); above, the
# payload is returned as a separate buffer so that it is never copied.
_JOIN_LIMIT = 16 * 1024
_ZEROES = bytes(1024 * 1024)

_BASE_ALLOCATION_MASK = int(BlockStatusFlags.HOLE | BlockStatusFlags.ZERO)

_SERVER_HANDSHAKE_FLAGS = HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES
# Plain ints: ``~`` of an IntFlag keeps only the defined bits, which would hide unknown ones.
_KNOWN_CLIENT_FLAGS = int(ClientFlags.C_FIXED_NEWSTYLE | ClientFlags.C_NO_ZEROES)

_COMMAND_BY_VALUE: dict[int, Command] = {c.value: c for c in Command}
_ALL_COMMAND_FLAGS = 0
for _flag in CommandFlags:
    _ALL_COMMAND_FLAGS |= _flag.value
_FLAGS_CACHE: dict[int, CommandFlags] = {}


def _command_flags(value: int) -> CommandFlags:
    # IntFlag construction is slow; there are only a few combinations on the hot path.
    flags = _FLAGS_CACHE.get(value)
    if flags is None:
        flags = _FLAGS_CACHE[value] = CommandFlags(value)
    return flags


def _option_or_int(value: int) -> Option | int:
    try:
        return Option(value)
    except ValueError:
        return value


def _name_of(enum_type: type[enum.IntEnum], value: int) -> str:
    try:
        return "NBD_" + ("OPT_" if enum_type is Option else "CMD_") + enum_type(value).name
    except ValueError:
        return f"unknown {'option' if enum_type is Option else 'command'} {value}"


# --- policy: what the server exports -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """One export as the protocol needs it.  ``backend`` is opaque to the core (the
    server keeps its Volume there) and comes back in ``ExportChosen``."""

    name: str
    size: int
    flags: TransmissionFlags = TransmissionFlags.HAS_FLAGS
    description: str = ""
    minimum_block: int = 1
    preferred_block: int = 4096
    maximum_block: int = 32 * 1024 * 1024
    # NAMEs of the ``qemu:dirty-bitmap:NAME`` metadata contexts this export offers.
    dirty_bitmaps: tuple[str, ...] = ()
    backend: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.size <= U64_MAX:
            raise ValueError(f"export size out of range: {self.size}")
        if not TransmissionFlags.HAS_FLAGS & self.flags:
            # "bit 0, NBD_FLAG_HAS_FLAGS: MUST always be 1."
            object.__setattr__(self, "flags", self.flags | TransmissionFlags.HAS_FLAGS)
        if (
            TransmissionFlags.SEND_FAST_ZERO & self.flags
            and not TransmissionFlags.SEND_WRITE_ZEROES & self.flags
        ):
            # "MUST set this transmission flag to 0 if NBD_FLAG_SEND_WRITE_ZEROES is not set"
            raise ValueError("SEND_FAST_ZERO needs SEND_WRITE_ZEROES")
        if TransmissionFlags.SEND_DF & self.flags:
            raise ValueError("SEND_DF is not supported by this server")
        lo, pref, hi = self.minimum_block, self.preferred_block, self.maximum_block
        # "[minimum] MUST be a power of 2, MUST NOT be larger than 2^16"
        if lo < 1 or lo & (lo - 1) or lo > 65536:
            raise ValueError(f"minimum block size must be a power of 2 <= 65536, not {lo}")
        # "[preferred] MUST be a power of 2 at least as large as the maximum of the minimum block
        # size and 2^9 (512)"
        if pref & (pref - 1) or pref < max(lo, 512):
            raise ValueError(f"preferred block size must be a power of 2 >= max(minimum, 512), not {pref}")
        # "[maximum] MUST be either an integer multiple of the minimum block size or the value
        # 0xffffffff ... MUST be at least as large as the smaller of the preferred block size or export size"
        if not (hi == U32_MAX or (0 < hi < U32_MAX and hi % lo == 0)) or hi < min(pref, self.size):
            raise ValueError(f"bad maximum block size {hi}")
        _check_string(self.name, "export name")
        for bitmap in self.dirty_bitmaps:
            _check_string(DIRTY_BITMAP_PREFIX + bitmap, "metadata context name")

    @classmethod
    def from_capabilities(
        cls, name: str, size: int, capabilities: Capabilities, description: str = "", backend: Any = None
    ) -> ExportInfo:
        """Advertise exactly what ``capabilities`` (a ``thinblock.blockdev.Capabilities``) says."""
        return cls(
            name=name,
            size=size,
            flags=transmission_flags(capabilities),
            description=description,
            minimum_block=capabilities.minimum_block,
            preferred_block=capabilities.preferred_block,
            maximum_block=capabilities.maximum_block,
            backend=backend,
        )


def transmission_flags(capabilities: Capabilities) -> TransmissionFlags:
    """Transmission flags for a volume's capabilities ("The server MUST NOT set the flag
    for features it does not support")."""
    flags = TransmissionFlags.HAS_FLAGS
    writable = capabilities.can_write
    if not writable:
        flags |= TransmissionFlags.READ_ONLY
    if capabilities.can_flush:
        flags |= TransmissionFlags.SEND_FLUSH
    if capabilities.can_fua and writable:
        flags |= TransmissionFlags.SEND_FUA
    if capabilities.can_trim and writable:
        flags |= TransmissionFlags.SEND_TRIM
    if capabilities.can_zero and writable:
        flags |= TransmissionFlags.SEND_WRITE_ZEROES
        if capabilities.can_fast_zero:
            flags |= TransmissionFlags.SEND_FAST_ZERO
    if capabilities.can_cache:
        flags |= TransmissionFlags.SEND_CACHE
    if capabilities.can_multi_conn:
        flags |= TransmissionFlags.CAN_MULTI_CONN
    return flags


ListExports = Callable[[], Iterable[tuple[str, str]]]
LookupExport = Callable[[str], ExportInfo | None]


# --- events ----------------------------------------------------------------------------------


class NeedData:
    """``next_event()`` has nothing more until more bytes arrive."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(frozen=True, slots=True)
class OptionRequest:
    """An option the core has answered (its replies are in ``data_to_send()``); for logs."""

    option: int  # an Option member when known
    reply: int  # the final reply type sent (an OptionReply member)
    export_name: str | None = None
    detail: str = ""


class TLSMode(enum.Enum):
    """The spec's server modes: OFF is NOTLS, REQUIRED is FORCEDTLS, ALLOWED is SELECTIVETLS
    with no TLS-only export (TLS at the client's choice; per-export policy is the ACL's)."""

    OFF = "off"
    ALLOWED = "allowed"
    REQUIRED = "required"


@dataclass(frozen=True, slots=True)
class StartTLS:
    """The client asked for TLS and the core acknowledged it (the ACK is in ``data_to_send()``).
    The application sends that ACK, performs the TLS handshake on the connection, then calls
    ``tls_started()``; until then the core takes no more input ("After an NBD_REP_ACK reply has
    been sent, the server MUST be prepared for a TLS handshake, and all further data MUST be sent
    and received over TLS")."""


@dataclass(frozen=True, slots=True)
class MetaContext:
    """A metadata context selected with NBD_OPT_SET_META_CONTEXT: its id on the wire, its name,
    and for ``qemu:dirty-bitmap:NAME`` the NAME (``bitmap``; None for ``base:allocation``)."""

    id: int
    name: str
    bitmap: str | None = None


@dataclass(frozen=True, slots=True)
class ExportChosen:
    """Negotiation is over (NBD_OPT_GO acknowledged, or NBD_OPT_EXPORT_NAME answered):
    transmission starts with this export.  ``contexts``: the metadata contexts BLOCK_STATUS
    answers, each with its own chunk (``reply_block_status``)."""

    export: ExportInfo
    structured_replies: bool
    base_allocation: bool
    contexts: tuple[MetaContext, ...] = ()


@dataclass(slots=True)
class Request:
    """A valid transmission request.  ``data`` is the WRITE payload (a memoryview the core
    never touches again), else None.  ``command`` and ``flags`` are enum members."""

    handle: int
    command: Command
    flags: CommandFlags
    offset: int
    length: int
    data: memoryview | None = None


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request that failed validation; the core has queued its error reply."""

    handle: int
    command: int
    flags: int
    offset: int
    length: int
    error: Errno
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client ended the session: NBD_CMD_DISC or NBD_OPT_ABORT (soft disconnect), or
    end of stream.  ``clean`` is False when the stream ended inside a message.  Finish the
    requests in flight, then close."""

    reason: str
    clean: bool = True


@dataclass(frozen=True, slots=True)
class ProtocolError:
    """The client broke a rule the stream cannot recover from: close the connection
    (a hard disconnect).  Anything in ``data_to_send()`` may still be sent first."""

    reason: str


Event = (
    NeedData
    | OptionRequest
    | StartTLS
    | ExportChosen
    | Request
    | RequestRejected
    | ConnectionClosed
    | ProtocolError
)


class ReplyError(ValueError):
    """The application asked for a reply the protocol does not allow (wrong data length,
    no extents...).  Nothing was queued; answer the request with an error instead."""


# --- encoders ---------------------------------------------------------------------------------


def _check_string(text: str, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > MAX_STRING_LENGTH or b"\0" in raw:
        raise ValueError(f"{what} must be at most {MAX_STRING_LENGTH} bytes of UTF-8 without NUL")
    return raw


def _truncate_string(text: str) -> bytes:
    raw = text.replace("\0", " ").encode("utf-8", "replace")
    if len(raw) > MAX_STRING_LENGTH:
        raw = raw[:MAX_STRING_LENGTH].decode("utf-8", "ignore").encode("utf-8")
    return raw


def encode_handshake(flags: int = _SERVER_HANDSHAKE_FLAGS) -> bytes:
    """S: NBDMAGIC, IHAVEOPT, 16 bits of handshake flags."""
    return _HANDSHAKE.pack(Magic.NBDMAGIC, Magic.IHAVEOPT, flags)


def encode_option_reply(option: int, reply: int, payload: Buffer = b"") -> bytes:
    """S: 0x3e889045565a9, option, reply type, length, payload."""
    return _OPTION_REPLY.pack(Magic.OPTION_REPLY, option, reply, len(payload)) + bytes(payload)


def encode_option_error(option: int, reply: int, message: str = "") -> bytes:
    """An error reply; "All error replies MAY have some data set, in which case that data is
    an error message string suitable for display to the user"."""
    return encode_option_reply(option, reply, _truncate_string(message))


def encode_rep_server(name: str, description: str = "") -> bytes:
    """NBD_REP_SERVER: 32-bit name length, name, then (our choice) the description."""
    raw = name.encode("utf-8")
    return encode_option_reply(
        Option.LIST, OptionReply.SERVER, _U32.pack(len(raw)) + raw + _truncate_string(description)
    )


def encode_info_export(option: int, size: int, flags: int) -> bytes:
    return encode_option_reply(option, OptionReply.INFO, _INFO_EXPORT.pack(InfoType.EXPORT, size, flags))


def encode_info_name(option: int, name: str) -> bytes:
    return encode_option_reply(option, OptionReply.INFO, _U16.pack(InfoType.NAME) + name.encode("utf-8"))


def encode_info_description(option: int, description: str) -> bytes:
    return encode_option_reply(
        option, OptionReply.INFO, _U16.pack(InfoType.DESCRIPTION) + _truncate_string(description)
    )


def encode_info_block_size(option: int, minimum: int, preferred: int, maximum: int) -> bytes:
    return encode_option_reply(
        option, OptionReply.INFO, _INFO_BLOCK_SIZE.pack(InfoType.BLOCK_SIZE, minimum, preferred, maximum)
    )


def encode_meta_context(option: int, context_id: int, name: str) -> bytes:
    """NBD_REP_META_CONTEXT: 32-bit context id, context name."""
    return encode_option_reply(option, OptionReply.META_CONTEXT, _U32.pack(context_id) + name.encode())


def encode_export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    """The answer to NBD_OPT_EXPORT_NAME: size, transmission flags, 124 zero bytes
    "unless NBD_FLAG_C_NO_ZEROES was negotiated by the client"."""
    reply = _EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + bytes(EXPORT_NAME_ZEROES)


def encode_simple_reply(handle: int, error: int = 0) -> bytes:
    """Simple reply header; a successful READ's data follows it."""
    return _SIMPLE_REPLY.pack(Magic.SIMPLE_REPLY, error, handle)


def encode_chunk_none(handle: int) -> bytes:
    """NBD_REPLY_TYPE_NONE, which "MUST always be used with the NBD_REPLY_FLAG_DONE bit set"."""
    return _CHUNK.pack(Magic.STRUCTURED_REPLY, ReplyFlags.DONE, ReplyType.NONE, handle, 0)


def encode_chunk_offset_data_header(handle: int, offset: int, data_length: int, done: bool = True) -> bytes:
    """Header of an NBD_REPLY_TYPE_OFFSET_DATA chunk; ``data_length`` bytes of data follow."""
    if data_length < 1:
        raise ReplyError("an OFFSET_DATA chunk carries at least one byte")
    return _CHUNK_OFFSET.pack(
        Magic.STRUCTURED_REPLY,
        ReplyFlags.DONE if done else 0,
        ReplyType.OFFSET_DATA,
        handle,
        data_length + 8,
        offset,
    )


def encode_chunk_offset_data(handle: int, offset: int, data: Buffer, done: bool = True) -> bytes:
    return encode_chunk_offset_data_header(handle, offset, len(data), done) + bytes(data)


def encode_chunk_offset_hole(handle: int, offset: int, length: int, done: bool = True) -> bytes:
    """NBD_REPLY_TYPE_OFFSET_HOLE: 64-bit offset, 32-bit hole size ("MUST be nonzero")."""
    if not 0 < length <= U32_MAX:
        raise ReplyError(f"bad hole size {length}")
    return _CHUNK_HOLE.pack(
        Magic.STRUCTURED_REPLY,
        ReplyFlags.DONE if done else 0,
        ReplyType.OFFSET_HOLE,
        handle,
        12,
        offset,
        length,
    )


def encode_chunk_error(handle: int, error: int, message: str = "", done: bool = True) -> bytes:
    """NBD_REPLY_TYPE_ERROR: 32-bit error ("MUST be nonzero"), 16-bit message length, message."""
    if not error:
        raise ReplyError("an error chunk needs a nonzero error")
    raw = _truncate_string(message)
    return (
        _CHUNK_ERROR.pack(
            Magic.STRUCTURED_REPLY,
            ReplyFlags.DONE if done else 0,
            ReplyType.ERROR,
            handle,
            6 + len(raw),
            error,
            len(raw),
        )
        + raw
    )


def encode_chunk_block_status(
    handle: int, context_id: int, descriptors: list[tuple[int, int]], done: bool = True
) -> bytes:
    """NBD_REPLY_TYPE_BLOCK_STATUS: context id, then (length, status flags) descriptors."""
    if not descriptors:
        raise ReplyError("a block status chunk needs at least one descriptor")
    flat: list[int] = [context_id]
    for length, status in descriptors:
        flat.append(length)
        flat.append(status)
    payload = struct.pack(f">{len(flat)}I", *flat)
    return (
        _CHUNK.pack(
            Magic.STRUCTURED_REPLY,
            ReplyFlags.DONE if done else 0,
            ReplyType.BLOCK_STATUS,
            handle,
            len(payload),
        )
        + payload
    )


def encode_request(handle: int, command: int, flags: int = 0, offset: int = 0, length: int = 0) -> bytes:
    """A request header, as a client sends it (for tests and tools); a WRITE's data follows."""
    return _REQUEST.pack(Magic.REQUEST, flags, command, handle, offset, length)


def encode_option(option: int, payload: Buffer = b"") -> bytes:
    """An option request, as a client sends it (for tests and tools)."""
    return _OPTION_HEADER.pack(Magic.IHAVEOPT, option, len(payload)) + bytes(payload)


# --- the state machine -------------------------------------------------------------------------


class _State(enum.Enum):
    CLIENT_FLAGS = "waiting for client flags"
    OPTIONS = "option haggling"
    TLS_HANDSHAKE = "TLS handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class _Invalid(Exception):
    """An option payload that does not parse: answered with NBD_REP_ERR_INVALID."""


class _Target(enum.Enum):
    BUFFER = 0
    PAYLOAD = 1
    DISCARD = 2


def _list_contexts(export: ExportInfo, queries: list[str]) -> list[str]:
    """The context names an NBD_OPT_LIST_META_CONTEXT answers, each once.  "If zero queries are
    sent, then the server MUST return all the metadata contexts that are available"; ``base:`` is
    the base namespace's wildcard ("MUST support this as a wildcard during
    NBD_OPT_LIST_META_CONTEXT"); ``qemu:`` and ``qemu:dirty-bitmap:`` are qemu's ("returns list
    of all available [dirty-bitmap] metadata contexts", docs/interop/nbd.rst); other names only
    when they exist."""
    bitmaps = [DIRTY_BITMAP_PREFIX + name for name in export.dirty_bitmaps]
    if not queries:
        return [BASE_ALLOCATION, *bitmaps]
    names: dict[str, None] = {}  # ordered, without repeats
    for query in queries:
        if query in ("base:", BASE_ALLOCATION):
            names[BASE_ALLOCATION] = None
        elif query in (QEMU_NAMESPACE, DIRTY_BITMAP_PREFIX):
            names.update(dict.fromkeys(bitmaps))
        elif query in bitmaps:
            names[query] = None
    return list(names)


def _decode_string(raw: Buffer, what: str) -> str:
    # "a sequence of UTF-8 code points, which is not NUL terminated, MUST NOT contain NUL
    # characters, SHOULD be no longer than 256 bytes and MUST be no longer than 4096 bytes"
    if len(raw) > MAX_STRING_LENGTH:
        raise _Invalid(f"{what} is longer than {MAX_STRING_LENGTH} bytes")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid(f"{what} is not valid UTF-8") from None
    if "\0" in text:
        raise _Invalid(f"{what} contains a NUL character")
    return text


class ServerConnection:
    """One client connection, server side.  See the module docstring."""

    def __init__(
        self,
        *,
        list_exports: ListExports,
        lookup_export: LookupExport,
        default_export: str | None = None,
        max_option_length: int = DEFAULT_MAX_OPTION_LENGTH,
        max_options: int = DEFAULT_MAX_OPTIONS,
        max_discard: int = DEFAULT_MAX_DISCARD,
        tls: TLSMode = TLSMode.OFF,
    ) -> None:
        self._list_exports = list_exports
        self.tls_mode = tls
        self.tls_active = False  # the TLS handshake completed (tls_started)
        self._lookup_export = lookup_export
        self._default_export = default_export
        self._max_option_length = max_option_length
        self._max_options = max_options
        self._max_discard = max_discard

        self._state = _State.CLIENT_FLAGS
        self._terminal: ConnectionClosed | ProtocolError | None = None
        self._outbox: list[bytes] = [encode_handshake()]

        # Receive buffer: unparsed bytes are _buf[_start:_end].
        self._buf = bytearray(_NEGOTIATION_BUFFER)
        self._start = 0
        self._end = 0
        self._need = 0  # size of the message being waited for, when larger than what we have
        self._eof = False
        self._target = _Target.BUFFER
        self._scratch: bytearray | None = None
        # A WRITE payload being received into a buffer of its own.
        self._payload: bytearray | None = None
        self._payload_filled = 0
        self._payload_request: Request | None = None
        self._discard = 0  # bytes of a refused WRITE's payload still to drop

        # Negotiated state.
        self.client_flags = ClientFlags(0)
        self.structured_replies = False
        # The export the last SET_META_CONTEXT selected contexts for, and those contexts.
        self._meta_export: str | None = None
        self._meta_selected: tuple[MetaContext, ...] = ()
        self._options_seen = 0
        self.export: ExportInfo | None = None
        self.base_allocation = False
        self.meta_contexts: tuple[MetaContext, ...] = ()  # in transmission: what BLOCK_STATUS answers
        self._context_masks: dict[int, int] = {}  # context id -> the status bits it defines
        # Transmission-phase validation tables (filled when the export is chosen).
        self._size = 0
        self._export_flags = TransmissionFlags.HAS_FLAGS
        self._min_block = 1
        self._max_block = 0
        self._allowed_flags: dict[int, int] = {}
        self._refusals: dict[int, tuple[Errno, str]] = {}

    # --- introspection ---------------------------------------------------------------------
    @property
    def state(self) -> str:
        return self._state.value

    @property
    def in_transmission(self) -> bool:
        return self._state is _State.TRANSMISSION

    def tls_started(self) -> None:
        """The TLS handshake that ``StartTLS`` asked for completed: option haggling goes on,
        encrypted, from a clean slate ("the server MUST NOT preserve any negotiation state
        (such as a request for NBD_OPT_STRUCTURED_REPLY, or metadata contexts from
        NBD_OPT_SET_META_CONTEXT) issued before this command")."""
        if self._state is not _State.TLS_HANDSHAKE:
            raise RuntimeError(f"tls_started() in state {self._state.value}")
        if self._end > self._start:
            self._fail("plaintext data during the TLS handshake")
            return
        self.tls_active = True
        self.structured_replies = False
        self._meta_export = None
        self._meta_selected = ()
        self._state = _State.OPTIONS

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for messages not yet complete (receive buffer and a partial payload)."""
        return (self._end - self._start) + (len(self._payload) if self._payload is not None else 0)

    # --- input -------------------------------------------------------------------------------
    def receive_data(self, data: Buffer) -> None:
        """Feed bytes received from the client; ``b""`` means end of stream."""
        if not data:
            self._eof = True
            return
        if self._terminal is not None:
            return
        view = memoryview(data).cast("B")
        if self._payload is not None:
            room = len(self._payload) - self._payload_filled
            if room:
                take = min(room, len(view))
                self._payload[self._payload_filled : self._payload_filled + take] = view[:take]
                self._payload_filled += take
                view = view[take:]
        if self._discard and view:
            take = min(self._discard, len(view))
            self._discard -= take
            view = view[take:]
        if view:
            self._make_room(len(view))
            end = self._end + len(view)
            self._buf[self._end : end] = view
            self._end = end

    def receive_eof(self) -> None:
        self._eof = True

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """A writable buffer to receive into; then call ``buffer_updated(nbytes)``."""
        if self._terminal is None:
            if self._payload is not None and self._payload_filled < len(self._payload):
                self._target = _Target.PAYLOAD
                return memoryview(self._payload)[self._payload_filled :]
            if not self._discard:
                self._target = _Target.BUFFER
                self._make_room(_MIN_FREE)
                return memoryview(self._buf)[self._end :]
        self._target = _Target.DISCARD
        if self._scratch is None:
            self._scratch = bytearray(_SCRATCH)
        size = min(self._discard, _SCRATCH) if self._discard else _SCRATCH
        return memoryview(self._scratch)[:size]

    def buffer_updated(self, nbytes: int) -> None:
        if nbytes <= 0:
            return
        target = self._target
        if target is _Target.PAYLOAD:
            self._payload_filled += nbytes
        elif target is _Target.BUFFER:
            self._end += nbytes
        elif self._discard:
            self._discard -= min(nbytes, self._discard)

    def _make_room(self, extra: int) -> None:
        """Make sure ``extra`` more bytes (and the message being waited for) fit after _end."""
        start, end = self._start, self._end
        capacity = len(self._buf)
        wanted = max(extra, self._need - (end - start))
        if capacity - end >= wanted:
            return
        live = end - start
        if start and capacity - live >= wanted:
            # Move the unparsed tail to the front; same length, so this never resizes a buffer
            # the event loop may still hold a view of.
            self._buf[0:live] = self._buf[start:end]
        else:
            new = bytearray(max(capacity * 2, live + wanted))
            new[0:live] = self._buf[start:end]
            self._buf = new
        self._start, self._end = 0, live

    # --- output ------------------------------------------------------------------------------
    def data_to_send(self) -> bytes:
        """Bytes the core produced by itself (greeting, option replies, replies to rejected
        requests) since the last call."""
        if not self._outbox:
            return b""
        out = b"".join(self._outbox)
        self._outbox.clear()
        return out

    # --- events ------------------------------------------------------------------------------
    def next_event(self) -> Event:
        """The next event, or ``NEED_DATA``.  Never raises on any input."""
        if self._terminal is not None:
            return self._terminal
        try:
            if self._state is _State.TRANSMISSION:
                return self._next_request()
            if self._state is _State.OPTIONS:
                return self._next_option()
            if self._state is _State.TLS_HANDSHAKE:
                if self._end > self._start or self._payload is not None:
                    # Plaintext that reached the core while TLS was being set up must never be
                    # taken as options (the STARTTLS command injection problem of other protocols).
                    return self._fail("plaintext data during the TLS handshake")
                return NEED_DATA  # the application owns the connection until tls_started()
            return self._next_client_flags()
        except Exception as exc:  # a bug must cost only this connection
            return self._fail(f"internal error while parsing: {exc!r}")

    def _fail(self, reason: str) -> ProtocolError:
        self._terminal = error = ProtocolError(reason)
        self._state = _State.CLOSED
        self._release()
        return error

    def _close(self, reason: str, clean: bool = True) -> ConnectionClosed:
        self._terminal = closed = ConnectionClosed(reason, clean)
        self._state = _State.CLOSED
        self._release()
        return closed

    def _release(self) -> None:
        self._payload = None
        self._payload_request = None
        self._discard = 0
        self._start = self._end = 0
        self._need = 0

    def _at_eof(self, available: int, wanted: int) -> Event:
        if not self._eof:
            self._need = wanted
            return NEED_DATA
        if available == 0:
            return self._close("client closed the connection")
        return self._close(
            f"client closed the connection in the middle of a message ({available} of {wanted} bytes)",
            clean=False,
        )

    def _consumed(self, n: int) -> None:
        self._start += n
        self._need = 0
        if self._start == self._end:
            self._start = self._end = 0

    # --- handshake ---------------------------------------------------------------------------
    def _next_client_flags(self) -> Event:
        available = self._end - self._start
        if available < 4:
            return self._at_eof(available, 4)
        (flags,) = _CLIENT_FLAGS.unpack_from(self._buf, self._start)
        self._consumed(4)
        if flags & ~_KNOWN_CLIENT_FLAGS:
            # "the server MUST drop the TCP connection if the client sets an unknown flag"
            return self._fail(f"client sent unknown client flags {flags:#x}")
        self.client_flags = ClientFlags(flags)
        self._state = _State.OPTIONS
        return self._next_option()

    def _next_option(self) -> Event:
        available = self._end - self._start
        if available < OPTION_HEADER_SIZE:
            return self._at_eof(available, OPTION_HEADER_SIZE)
        magic, option, length = _OPTION_HEADER.unpack_from(self._buf, self._start)
        if magic != Magic.IHAVEOPT:
            return self._fail(f"bad option magic {magic:#018x}")
        if length > self._max_option_length:
            # A hard disconnect is allowed when "a server believes a client's behaviour constitutes
            # a denial of service"; say why first -- except to NBD_OPT_EXPORT_NAME, which has no
            # option reply at all: the spec's only answer to a refused one is to end the session.
            if option == Option.EXPORT_NAME:
                return self._fail(f"NBD_OPT_EXPORT_NAME of {length} bytes is too large")
            self._outbox.append(
                encode_option_error(
                    option,
                    OptionReply.ERR_TOO_BIG,
                    f"option data of {length} bytes is larger than this server accepts "
                    f"({self._max_option_length})",
                )
            )
            return self._fail(f"{_name_of(Option, option)}: option data of {length} bytes is too large")
        total = OPTION_HEADER_SIZE + length
        if available < total:
            return self._at_eof(available, total)
        self._options_seen += 1
        if self._options_seen > self._max_options:
            return self._fail(f"client sent more than {self._max_options} options")
        start = self._start + OPTION_HEADER_SIZE
        data = bytes(self._buf[start : start + length])
        self._consumed(total)
        return self._handle_option(option, data)

    def _reply(self, option: int, reply: int, payload: Buffer = b"") -> None:
        self._outbox.append(encode_option_reply(option, reply, payload))

    def _handle_option(self, option: int, data: bytes) -> Event:
        if option == Option.ABORT:
            # "The server MUST reply with NBD_REP_ACK" ... "a server SHOULD ignore any data sent".
            self._reply(option, OptionReply.ACK)
            return self._close("client sent NBD_OPT_ABORT")
        if option == Option.STARTTLS and self.tls_mode is not TLSMode.OFF:
            return self._opt_starttls(data)
        if self.tls_mode is TLSMode.REQUIRED and not self.tls_active:
            # FORCEDTLS: "If the server receives a request to enter transmission mode via
            # NBD_OPT_EXPORT_NAME when TLS has not been initiated, then as this request cannot
            # error, it MUST terminate the session."
            if option == Option.EXPORT_NAME:
                return self._fail("NBD_OPT_EXPORT_NAME without TLS, which this server requires")
            # "If the server receives any other option, including NBD_OPT_INFO and unsupported
            # options, it MUST reply with NBD_REP_ERR_TLS_REQD if TLS has not been initiated".
            message = "TLS is required: send NBD_OPT_STARTTLS first"
            self._outbox.append(encode_option_error(option, OptionReply.ERR_TLS_REQD, message))
            return OptionRequest(_option_or_int(option), OptionReply.ERR_TLS_REQD, detail=message)
        if option == Option.EXPORT_NAME:
            return self._opt_export_name(data)
        try:
            if option in (Option.INFO, Option.GO):
                return self._opt_info_go(Option(option), data)
            if option == Option.LIST:
                return self._opt_list(data)
            if option == Option.STRUCTURED_REPLY:
                if data:
                    raise _Invalid("NBD_OPT_STRUCTURED_REPLY carries no data")
                self.structured_replies = True
                self._reply(option, OptionReply.ACK)
                return OptionRequest(Option.STRUCTURED_REPLY, OptionReply.ACK)
            if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
                return self._opt_meta_context(Option(option), data)
        except _Invalid as exc:
            self._outbox.append(encode_option_error(option, OptionReply.ERR_INVALID, str(exc)))
            return OptionRequest(_option_or_int(option), OptionReply.ERR_INVALID, detail=str(exc))
        # STARTTLS, EXTENDED_HEADERS, PEEK_EXPORT and anything unknown: "Servers that receive
        # messages which they do not implement MUST reply to them with NBD_REP_ERR_UNSUP".
        message = f"option {_name_of(Option, option)} is not supported"
        self._outbox.append(encode_option_error(option, OptionReply.ERR_UNSUP, message))
        return OptionRequest(_option_or_int(option), OptionReply.ERR_UNSUP, detail=message)

    def _opt_starttls(self, data: bytes) -> Event:
        if self.tls_active:
            # "If the server receives NBD_OPT_STARTTLS when TLS has already been negotiated, it
            # MUST reply with NBD_REP_ERR_INVALID."
            message = "TLS is already active"
            self._outbox.append(encode_option_error(Option.STARTTLS, OptionReply.ERR_INVALID, message))
            return OptionRequest(Option.STARTTLS, OptionReply.ERR_INVALID, detail=message)
        if data:
            # "The client MUST NOT send any additional data with the option" (NBD_REP_ERR_INVALID
            # "if the client included data").
            message = "NBD_OPT_STARTTLS carries no data"
            self._outbox.append(encode_option_error(Option.STARTTLS, OptionReply.ERR_INVALID, message))
            return OptionRequest(Option.STARTTLS, OptionReply.ERR_INVALID, detail=message)
        if self._end > self._start:
            # Bytes after STARTTLS, before our ACK: the client did not wait for the reply, and
            # what it sent cannot be handed to the TLS layer (the core has consumed it).
            return self._fail("data after NBD_OPT_STARTTLS before its reply")
        self._reply(Option.STARTTLS, OptionReply.ACK)
        self._state = _State.TLS_HANDSHAKE
        return StartTLS()

    def _resolve(self, name: str) -> ExportInfo | None:
        """Look an export up; "" selects the default export "(if any)"."""
        if not name:
            if self._default_export is None:
                return None
            name = self._default_export
        try:
            return self._lookup_export(name)
        except Exception:
            return None

    def _opt_export_name(self, data: bytes) -> Event:
        try:
            name = _decode_string(data, "export name")
        except _Invalid as exc:
            return self._fail(f"NBD_OPT_EXPORT_NAME: {exc}")
        export = self._resolve(name)
        if export is None:
            # "If the chosen export does not exist ... the server MUST terminate the session."
            return self._fail(f"NBD_OPT_EXPORT_NAME: no export named {name!r}")
        no_zeroes = bool(self.client_flags & ClientFlags.C_NO_ZEROES)
        self._outbox.append(encode_export_name_reply(export.size, export.flags, no_zeroes))
        return self._enter_transmission(export)

    def _opt_list(self, data: bytes) -> Event:
        if data:
            # "the server SHOULD reject a request that includes data with NBD_REP_ERR_INVALID"
            raise _Invalid("NBD_OPT_LIST carries no data")
        try:
            exports = list(self._list_exports())
        except Exception as exc:
            self._outbox.append(
                encode_option_error(Option.LIST, OptionReply.ERR_POLICY, "cannot list exports")
            )
            return OptionRequest(
                Option.LIST, OptionReply.ERR_POLICY, detail=f"listing exports failed: {exc!r}"
            )
        for name, description in exports:
            self._outbox.append(encode_rep_server(name, description))
        self._reply(Option.LIST, OptionReply.ACK)
        return OptionRequest(Option.LIST, OptionReply.ACK, detail=f"{len(exports)} exports")

    def _opt_info_go(self, option: Option, data: bytes) -> Event:
        # Data: 32-bit name length ("MUST be no larger than the option data length - 6"), name,
        # 16-bit number of information requests, 16 bits each.
        if len(data) < 6:
            raise _Invalid(f"{_name_of(Option, option)}: option data shorter than 6 bytes")
        (name_length,) = _U32.unpack_from(data, 0)
        if name_length > len(data) - 6:
            raise _Invalid(
                f"{_name_of(Option, option)}: export name length {name_length} runs past the option"
            )
        name = _decode_string(data[4 : 4 + name_length], "export name")
        (count,) = _U16.unpack_from(data, 4 + name_length)
        if len(data) != 4 + name_length + 2 + 2 * count:
            raise _Invalid(
                f"{_name_of(Option, option)}: {count} information requests do not match the length"
            )
        requests = {_U16.unpack_from(data, 6 + name_length + 2 * i)[0] for i in range(count)}
        export = self._resolve(name)
        if export is None:
            message = f"no export named {name!r}" if name else "there is no default export"
            self._outbox.append(encode_option_error(option, OptionReply.ERR_UNKNOWN, message))
            return OptionRequest(option, OptionReply.ERR_UNKNOWN, name, message)
        # "the server MUST send at least one NBD_REP_INFO, with an NBD_INFO_EXPORT information type".
        out = self._outbox
        out.append(encode_info_export(option, export.size, export.flags))
        if InfoType.NAME in requests:
            out.append(encode_info_name(option, export.name))
        if InfoType.DESCRIPTION in requests and export.description:
            out.append(encode_info_description(option, export.description))
        # Sent whether asked or not: our maximum is not the default ("The server MUST send this info
        # if it is requested and it intends to enforce block size constraints other than the defaults").
        out.append(
            encode_info_block_size(option, export.minimum_block, export.preferred_block, export.maximum_block)
        )
        self._reply(option, OptionReply.ACK)
        if option == Option.INFO:
            return OptionRequest(option, OptionReply.ACK, export.name)
        return self._enter_transmission(export)

    def _opt_meta_context(self, option: Option, data: bytes) -> Event:
        is_set = option == Option.SET_META_CONTEXT
        if is_set:
            # "Issuing this command replaces all previously-set metadata contexts (including when
            # this command fails)".
            self._meta_export = None
            self._meta_selected = ()
        if not self.structured_replies:
            # "This option MUST NOT be requested unless structured replies have been negotiated
            # first. If a client attempts to do so, a server SHOULD send NBD_REP_ERR_INVALID."
            raise _Invalid(f"{_name_of(Option, option)} needs NBD_OPT_STRUCTURED_REPLY first")
        # Data: 32-bit name length, name, 32-bit number of queries, each 32-bit length + query.
        if len(data) < 8:
            raise _Invalid(f"{_name_of(Option, option)}: option data shorter than 8 bytes")
        (name_length,) = _U32.unpack_from(data, 0)
        if name_length > len(data) - 8:
            raise _Invalid(
                f"{_name_of(Option, option)}: export name length {name_length} runs past the option"
            )
        name = _decode_string(data[4 : 4 + name_length], "export name")
        pos = 4 + name_length
        (count,) = _U32.unpack_from(data, pos)
        pos += 4
        if count * 4 > len(data) - pos:
            raise _Invalid(f"{_name_of(Option, option)}: {count} queries do not fit in the option")
        queries: list[str] = []
        for _ in range(count):
            if pos + 4 > len(data):
                raise _Invalid(f"{_name_of(Option, option)}: query length runs past the option")
            (query_length,) = _U32.unpack_from(data, pos)
            pos += 4
            if query_length > len(data) - pos:
                raise _Invalid(f"{_name_of(Option, option)}: query runs past the option")
            queries.append(_decode_string(data[pos : pos + query_length], "query"))
            pos += query_length
        if pos != len(data):
            raise _Invalid(f"{_name_of(Option, option)}: {len(data) - pos} stray bytes after the queries")
        export = self._resolve(name)
        if export is None:
            message = f"no export named {name!r}" if name else "there is no default export"
            self._outbox.append(encode_option_error(option, OptionReply.ERR_UNKNOWN, message))
            return OptionRequest(option, OptionReply.ERR_UNKNOWN, name, message)
        if is_set:
            selected = self._select_contexts(export, queries)
            for context in selected:
                self._reply(option, OptionReply.META_CONTEXT, _U32.pack(context.id) + context.name.encode())
            if selected:
                self._meta_export = export.name
                self._meta_selected = selected
            names = [context.name for context in selected]
        else:
            names = _list_contexts(export, queries)
            for name in names:
                # "The metadata context ID in these replies is reserved and SHOULD be set to zero".
                self._reply(option, OptionReply.META_CONTEXT, _U32.pack(0) + name.encode())
        self._reply(option, OptionReply.ACK)
        detail = ", ".join(names) + (" selected" if is_set else " listed") if names else "no context"
        return OptionRequest(option, OptionReply.ACK, export.name, detail)

    @staticmethod
    def _select_contexts(export: ExportInfo, queries: list[str]) -> tuple[MetaContext, ...]:
        """The contexts an NBD_OPT_SET_META_CONTEXT selects, with their ids.  "If zero queries are
        sent, the server MUST select no metadata contexts"; ``base:`` alone "the server MUST
        ignore ... during NBD_OPT_SET_META_CONTEXT", as are the ``qemu:`` and
        ``qemu:dirty-bitmap:`` wildcards ("the empty leaf-name ... SHOULD NOT select any
        contexts during NBD_OPT_SET_META_CONTEXT"); unknown names are ignored ("The server MAY
        ignore queries that do not select a single metadata context"); a name asked twice is
        selected once ("each with a unique metadata context ID")."""
        selected: dict[str, MetaContext] = {}
        bitmaps = set(export.dirty_bitmaps)
        next_id = BASE_ALLOCATION_ID + 1  # bitmaps: the ids after base:allocation's
        for query in queries:
            if query in selected:
                continue
            if query == BASE_ALLOCATION:
                selected[query] = MetaContext(BASE_ALLOCATION_ID, query)
            elif query.startswith(DIRTY_BITMAP_PREFIX) and query[len(DIRTY_BITMAP_PREFIX) :] in bitmaps:
                selected[query] = MetaContext(next_id, query, query[len(DIRTY_BITMAP_PREFIX) :])
                next_id += 1
        return tuple(selected.values())

    def _enter_transmission(self, export: ExportInfo) -> ExportChosen:
        self.export = export
        # "A client MUST NOT send NBD_CMD_BLOCK_STATUS unless ... the final time [SET_META_CONTEXT]
        # was sent, it referred to the same export name used to enter transmission phase".
        if self.structured_replies and self._meta_export == export.name:
            self.meta_contexts = self._meta_selected
        self.base_allocation = any(c.id == BASE_ALLOCATION_ID for c in self.meta_contexts)
        self._context_masks = {
            c.id: int(DirtyBitmapFlags.DIRTY) if c.bitmap is not None else _BASE_ALLOCATION_MASK
            for c in self.meta_contexts
        }
        self._state = _State.TRANSMISSION
        if len(self._buf) < _RECEIVE_BUFFER:
            # A new buffer, never a resize: the event loop may still hold a view of the old one.
            live = self._end - self._start
            grown = bytearray(_RECEIVE_BUFFER)
            grown[0:live] = self._buf[self._start : self._end]
            self._buf = grown
            self._start, self._end = 0, live
        self._size = export.size
        flags = self._export_flags = export.flags
        self._min_block = export.minimum_block
        self._max_block = export.maximum_block
        # "NBD_CMD_FLAG_FUA ... is valid for all commands, provided NBD_FLAG_SEND_FUA has been
        # negotiated".  Other flags only for the commands documented for them.
        # (Plain ints, so that ``flags & ~allowed`` also catches bits no enum member has.)
        fua = int(CommandFlags.FUA) if flags & TransmissionFlags.SEND_FUA else 0
        zero_flags = fua | int(CommandFlags.NO_HOLE)
        if flags & TransmissionFlags.SEND_FAST_ZERO:
            zero_flags |= int(CommandFlags.FAST_ZERO)
        # Commands this export refuses whatever their range.
        refusals: dict[int, tuple[Errno, str]] = {}
        if flags & TransmissionFlags.READ_ONLY:
            # "it SHOULD return NBD_EPERM if it receives a write or trim request on a read-only export"
            for command in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES):
                refusals[command] = (Errno.EPERM, f"{_name_of(Command, command)}: the export is read-only")
        for command, flag in (
            (Command.FLUSH, TransmissionFlags.SEND_FLUSH),
            (Command.TRIM, TransmissionFlags.SEND_TRIM),
            (Command.WRITE_ZEROES, TransmissionFlags.SEND_WRITE_ZEROES),
            (Command.CACHE, TransmissionFlags.SEND_CACHE),
        ):
            if not flags & flag and command not in refusals:
                refusals[command] = (Errno.EINVAL, f"{_name_of(Command, command)} was not advertised")
        if not self.meta_contexts:
            # "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS without
            # selecting at least one metadata context."
            refusals[Command.BLOCK_STATUS] = (
                Errno.EINVAL,
                "NBD_CMD_BLOCK_STATUS without a negotiated metadata context",
            )
        self._refusals = refusals
        self._allowed_flags = {
            Command.READ: fua,
            Command.WRITE: fua,
            Command.FLUSH: fua,
            Command.TRIM: fua,
            Command.CACHE: fua,
            Command.WRITE_ZEROES: zero_flags,
            Command.BLOCK_STATUS: fua | int(CommandFlags.REQ_ONE),
        }
        return ExportChosen(export, self.structured_replies, self.base_allocation, self.meta_contexts)

    # --- transmission ------------------------------------------------------------------------
    def _next_request(self) -> Event:
        payload = self._payload
        if payload is not None:
            if self._payload_filled < len(payload):
                if self._eof:
                    return self._close(
                        f"client closed the connection in the middle of a write payload "
                        f"({self._payload_filled} of {len(payload)} bytes)",
                        clean=False,
                    )
                return NEED_DATA
            request = self._payload_request
            assert request is not None
            request.data = memoryview(payload)
            self._payload = self._payload_request = None
            return request
        if self._discard:
            if self._eof:
                return self._close(
                    "client closed the connection in the middle of a write payload", clean=False
                )
            return NEED_DATA
        start = self._start
        available = self._end - start
        if available < REQUEST_SIZE:
            if available >= 4:
                (magic,) = _U32.unpack_from(self._buf, start)
                # Fail early on a bad magic; wait for 8 bytes to tell an option ('IHAVEOPT') apart.
                if magic != _REQUEST_MAGIC and (magic != _IHAVEOPT_HIGH or available >= 8 or self._eof):
                    return self._bad_magic(start, available)
            return self._at_eof(available, REQUEST_SIZE)
        magic, flags, command, handle, offset, length = _REQUEST.unpack_from(self._buf, start)
        if magic != _REQUEST_MAGIC:
            return self._bad_magic(start, available)
        self._consumed(REQUEST_SIZE)

        allowed = self._allowed_flags.get(command)
        if allowed is not None and not flags & ~allowed:
            error, reason = self._check_range(command, offset, length)
        else:
            error, reason = self._check_command(command, flags, allowed)
        if command == _CMD_WRITE:
            if error:
                return self._refuse_write(handle, flags, offset, length, error, reason)
            return self._start_write(handle, flags, offset, length)
        if error:
            return self._reject(handle, command, flags, offset, length, error, reason)
        if command == _CMD_DISC:
            # "A client MUST NOT send anything to the server after sending an NBD_CMD_DISC";
            # the server "MUST handle all outstanding requests" and then close.
            return self._close("client sent NBD_CMD_DISC")
        return Request(handle, _COMMAND_BY_VALUE[command], _command_flags(flags), offset, length)

    def _bad_magic(self, start: int, available: int) -> ProtocolError:
        # Without a valid header the stream cannot be resynchronised: a hard disconnect.
        if available >= 8 and _OPTION_HEADER.unpack_from(self._buf, start)[0] == Magic.IHAVEOPT:
            return self._fail("client sent an option after negotiation ended")
        (magic,) = _U32.unpack_from(self._buf, start)
        return self._fail(f"bad request magic {magic:#010x}")

    def _check_command(self, command: int, flags: int, allowed: int | None) -> tuple[Errno, str]:
        """Why a request with this command and these flags is refused (the slow path)."""
        name = _name_of(Command, command)
        if command == _CMD_DISC:
            return _OK
        if allowed is None:
            # "The server SHOULD return NBD_EINVAL if it receives an unknown command."
            return Errno.EINVAL, f"{name} is not supported"
        unknown = flags & ~_ALL_COMMAND_FLAGS
        if unknown:
            return Errno.EINVAL, f"{name}: unknown command flags {unknown:#x}"
        # "It also SHOULD return NBD_EINVAL if it receives a request with a flag not explicitly
        # documented as applicable to the given request."
        refused = _command_flags(flags & ~allowed)
        return Errno.EINVAL, f"{name}: flags {refused!r} are not allowed for this command or not negotiated"

    def _check_range(self, command: int, offset: int, length: int) -> tuple[Errno, str]:
        """Validate a request whose command and flags are acceptable (the hot path)."""
        refusal = self._refusals.get(command)
        if refusal is not None:
            return refusal
        if command == _CMD_FLUSH:
            # "For a flush request, length and offset are reserved, and MUST be set to all-zero."
            if offset or length:
                return Errno.EINVAL, f"NBD_CMD_FLUSH with offset {offset} and length {length} (must be 0)"
            return _OK
        if command == _CMD_BLOCK_STATUS and not length:
            return Errno.EINVAL, "NBD_CMD_BLOCK_STATUS of length 0"
        if offset + length > self._size:  # Python ints: no 64-bit wrap-around
            name = _name_of(Command, command)
            reason = f"{name}: offset {offset} + length {length} is past the end of the export"
            reason += f" ({self._size} bytes)"
            # "The server SHOULD return NBD_ENOSPC if it receives a write request including one or
            # more sectors beyond the size of the device" (and likewise write zeroes); "NBD_EINVAL
            # if it receives a read or trim request including one or more sectors beyond the size".
            if command in (_CMD_WRITE, _CMD_WRITE_ZEROES):
                return Errno.ENOSPC, reason
            return Errno.EINVAL, reason
        minimum = self._min_block
        if minimum > 1 and (offset % minimum or length % minimum):
            # "The server SHOULD report an NBD_EINVAL error if the client's request is not aligned
            # to advertised minimum block size boundaries"
            return Errno.EINVAL, (
                f"{_name_of(Command, command)}: offset {offset} / length {length} not aligned to {minimum}"
            )
        if length > self._max_block and command in _PAYLOAD_COMMANDS:
            # "... or is larger than the advertised maximum block size."  TRIM, BLOCK_STATUS and
            # WRITE_ZEROES carry no payload: they are accepted up to the export size (qemu sends
            # zeroing requests larger than the maximum block size).
            return Errno.EINVAL, (
                f"{_name_of(Command, command)}: length {length} is larger than the maximum block size "
                f"{self._max_block}"
            )
        return _OK

    def _start_write(self, handle: int, flags: int, offset: int, length: int) -> Event:
        request = Request(handle, _COMMAND_WRITE, _command_flags(flags), offset, length)
        start = self._start
        available = self._end - start
        if available >= length:
            # The whole payload is here: one copy out of the receive buffer.
            request.data = memoryview(self._buf[start : start + length])
            self._consumed(length)
            return request
        payload = bytearray(length)
        payload[0:available] = memoryview(self._buf)[start : self._end]
        self._consumed(available)
        self._payload = payload
        self._payload_filled = available
        self._payload_request = request
        return self._next_request()

    def _refuse_write(
        self, handle: int, flags: int, offset: int, length: int, error: Errno, reason: str
    ) -> Event:
        # "a rejected WRITE's payload must still be consumed so the stream stays in step"; beyond
        # max_discard the length itself is a denial of service ("either the server or the client
        # MAY initiate a hard disconnect if the payload of an NBD_CMD_WRITE request ... would be
        # large enough to be deemed a denial of service attack").
        if length > self._max_discard:
            return self._fail(f"{reason}; its payload of {length} bytes is too large to skip")
        available = self._end - self._start
        take = min(available, length)
        self._consumed(take)
        self._discard = length - take
        return self._reject(handle, Command.WRITE, flags, offset, length, error, reason)

    def _reject(
        self, handle: int, command: int, flags: int, offset: int, length: int, error: Errno, reason: str
    ) -> RequestRejected:
        if self.structured_replies:
            # Structured replies: "MUST NOT use a simple reply for NBD_CMD_READ (even for the case of
            # an early NBD_EINVAL due to bad flags)"; errors "SHOULD" be structured to carry a message.
            self._outbox.append(encode_chunk_error(handle, error, reason))
        else:
            self._outbox.append(encode_simple_reply(handle, error))
        return RequestRejected(handle, command, flags, offset, length, error, reason)

    # --- replies -----------------------------------------------------------------------------
    def reply_ok(self, request: Request) -> bytes:
        """Success for a request without reply payload (WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE).
        A simple reply: allowed with structured replies for "any request other than NBD_CMD_READ,
        but only if the reply has no data payload"."""
        command = request.command
        if command is _COMMAND_READ and (self.structured_replies or request.length):
            raise ReplyError("a successful NBD_CMD_READ needs reply_read")
        if command is _COMMAND_BLOCK_STATUS:
            raise ReplyError("a successful NBD_CMD_BLOCK_STATUS needs reply_block_status")
        return _SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, request.handle)

    def reply_error(self, request: Request, error: Errno | int, message: str = "") -> bytes:
        """Failure of any request: a structured ERROR chunk when structured replies were
        negotiated (with the message), else a simple reply with the error (and no data)."""
        if not error:
            raise ReplyError("reply_error needs a nonzero error")
        if self.structured_replies:
            return encode_chunk_error(request.handle, error, message)
        return _SIMPLE_REPLY.pack(_SIMPLE_MAGIC, error, request.handle)

    def reply_read(self, request: Request, data: Buffer) -> list[Buffer]:
        """Success of a READ: ``data`` is exactly ``request.length`` bytes.  Returns the
        buffers to write in order (the data itself is not copied when large)."""
        length = request.length
        if len(data) != length:
            raise ReplyError(f"read returned {len(data)} bytes for a request of {length}")
        if not length:
            if self.structured_replies:
                return [encode_chunk_none(request.handle)]
            return [_SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, request.handle)]
        header = self.reply_read_header(request)
        if length <= _JOIN_LIMIT:
            return [header + data]
        return [header, data]

    def reply_read_header(self, request: Request) -> bytes:
        """The bytes that go before a successful READ's ``request.length`` bytes of data, for a
        server that sends the data itself (``sendfile``): the simple reply header, or one
        NBD_REPLY_TYPE_OFFSET_DATA chunk header for the whole request with NBD_REPLY_FLAG_DONE.
        The data must follow at once and in full: nothing, not even an error, can be sent on
        this connection in between."""
        if request.command != Command.READ or not request.length:
            raise ReplyError("reply_read_header answers a READ of at least one byte")
        if self.structured_replies:
            return _CHUNK_OFFSET.pack(
                _STRUCTURED_MAGIC,
                _DONE,
                _TYPE_OFFSET_DATA,
                request.handle,
                request.length + 8,
                request.offset,
            )
        return _SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, request.handle)

    def reply_read_extents(
        self, request: Request, pieces: Iterable[tuple[int, int, Buffer | None]]
    ) -> list[Buffer]:
        """Success of a READ given as pieces ``(offset, length, data or None for zeros)`` that
        cover the request in order.  With structured replies holes become OFFSET_HOLE chunks
        (no zeros on the wire); otherwise zeros are sent."""
        handle = request.handle
        position = request.offset
        end = position + request.length
        # Validate and merge adjacent holes first.
        merged: list[tuple[int, int, Buffer | None]] = []
        for offset, length, data in pieces:
            if offset != position or length <= 0 or offset + length > end:
                raise ReplyError(f"read piece ({offset}, {length}) does not continue at {position}")
            if data is not None and len(data) != length:
                raise ReplyError(f"read piece at {offset} has {len(data)} bytes, not {length}")
            if data is None and merged and merged[-1][2] is None:
                previous = merged[-1]
                merged[-1] = (previous[0], previous[1] + length, None)
            else:
                merged.append((offset, length, data))
            position += length
        if position != end:
            raise ReplyError(f"read pieces end at {position}, not {end}")
        out: list[Buffer] = []
        if not self.structured_replies:
            out.append(_SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, handle))
            for _offset, length, data in merged:
                if data is not None:
                    out.append(data)
                else:
                    while length:
                        n = min(length, len(_ZEROES))
                        out.append(memoryview(_ZEROES)[:n])
                        length -= n
            return _join_small(out)
        if not merged:
            return [encode_chunk_none(handle)]
        last = len(merged) - 1
        for i, (offset, length, data) in enumerate(merged):
            # The data is all here already: no error can be detected while sending the last
            # chunk, so it may carry NBD_REPLY_FLAG_DONE.
            flags = _DONE if i == last else 0
            if data is None:
                out.append(
                    _CHUNK_HOLE.pack(_STRUCTURED_MAGIC, flags, _TYPE_OFFSET_HOLE, handle, 12, offset, length)
                )
            else:
                out.append(
                    _CHUNK_OFFSET.pack(
                        _STRUCTURED_MAGIC, flags, _TYPE_OFFSET_DATA, handle, length + 8, offset
                    )
                )
                out.append(data)
        return _join_small(out)

    def reply_block_status(
        self,
        request: Request,
        extents: Iterable[tuple[int, int]] | None = None,
        *,
        contexts: Iterable[tuple[int, Iterable[tuple[int, int]]]] | None = None,
    ) -> bytes:
        """Success of a BLOCK_STATUS.  ``extents``: ``(length, flags)`` runs from the request's
        offset on, for the one context negotiated; with several, ``contexts`` gives
        ``(context id, extents)`` for each of them ("A successful block status request MUST have
        exactly one status chunk per negotiated metadata context ID"; the last chunk carries
        NBD_REPLY_FLAG_DONE).  Each context's runs are merged, truncated to the request ("the sum
        of the length fields of the first N-1 extents (if any) MUST be less than the requested
        length"; with NBD_CMD_FLAG_REQ_ONE "exactly one descriptor where the length of the
        descriptor MUST NOT be greater than the length of the request"), their flags masked to
        the bits the context defines, at most 2^20 descriptors a chunk."""
        if request.command != Command.BLOCK_STATUS or not self.meta_contexts:
            raise ReplyError("reply_block_status answers NBD_CMD_BLOCK_STATUS only")
        if (extents is None) == (contexts is None):
            raise ReplyError("reply_block_status takes extents or contexts, not both")
        if contexts is None:
            if len(self.meta_contexts) != 1:
                raise ReplyError(f"{len(self.meta_contexts)} contexts were negotiated: answer each of them")
            assert extents is not None
            contexts = [(self.meta_contexts[0].id, extents)]
        answers = list(contexts)
        ids = [context_id for context_id, _ in answers]
        if sorted(ids) != sorted(self._context_masks):
            raise ReplyError(f"block status answers contexts {ids}, negotiated {sorted(self._context_masks)}")
        req_one = bool(request.flags & CommandFlags.REQ_ONE)
        chunks = []
        last = len(answers) - 1
        for i, (context_id, runs) in enumerate(answers):
            descriptors = _descriptors(runs, request.length, self._context_masks[context_id], req_one)
            chunks.append(encode_chunk_block_status(request.handle, context_id, descriptors, done=i == last))
        return b"".join(chunks)


def _descriptors(
    runs: Iterable[tuple[int, int]], length: int, mask: int, req_one: bool
) -> list[tuple[int, int]]:
    remaining = length
    descriptors: list[tuple[int, int]] = []
    for run_length, status in runs:
        if run_length <= 0:
            continue
        # "the remainder of the flags field is reserved. Servers SHOULD set it to all-zero"
        status = int(status) & mask
        run_length = min(run_length, remaining)
        if descriptors and descriptors[-1][1] == status:
            descriptors[-1] = (descriptors[-1][0] + run_length, status)
        else:
            if descriptors and (req_one or len(descriptors) == MAX_DESCRIPTORS):
                break
            descriptors.append((run_length, status))
        remaining -= run_length
        if not remaining:
            break
    if not descriptors:
        raise ReplyError("block status needs at least one extent of nonzero length")
    return descriptors


def _join_small(buffers: list[Buffer]) -> list[Buffer]:
    """Join runs of small buffers (headers, small data) so that each write is worth a syscall,
    leaving large data buffers alone."""
    out: list[Buffer] = []
    run: list[Buffer] = []
    run_size = 0
    for buf in buffers:
        if len(buf) > _JOIN_LIMIT:
            if run:
                out.append(b"".join(run))
                run, run_size = [], 0
            out.append(buf)
        else:
            run.append(buf)
            run_size += len(buf)
    if run:
        out.append(b"".join(run))
    return out
