"""The iSCSI connection core, sans-IO: bytes in, events out (the h11 shape).

One ``TargetConnection`` per TCP connection.  What the connections of a session share (the
CmdSN window, the leading connection's values, the members by CID) is a ``Session``
(``session.py``): a Login with a non-zero TSIH adds a connection to the session it names.

The core does everything the protocol alone decides: login (security and operational
negotiation, CHAP), SendTargets and Text, NOP-In replies, CmdSN ordering, collecting a
write's data (immediate, unsolicited, and solicited with R2T under the negotiated burst
lengths), splitting Data-In into the initiator's segment size, StatSN/DataSN/R2TSN, and
Reject.  It hands the layer above only what needs storage or policy:

* ``LoginComplete`` -- the connection reached full feature phase (normal or discovery);
* ``ScsiCommand`` -- a command with all of its Data-Out collected, to execute;
* ``TaskManagement`` -- ABORT TASK, LUN RESET...: answered with ``task_management_done``;
* ``LogoutRequested`` -- answered with ``logout_done`` once the tasks finished;
* ``ConnectionClosed`` -- the end (a protocol error, a failed login, EOF).

Error recovery level 0 (RFC 7143 7.1.5): anything the core cannot accept closes the
connection, after a Reject or a failed Login Response where the protocol has one.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from thinblock.blockdev import FileSpan

from .constants import (
    BHS_LENGTH,
    CONTINUE_BIT,
    FINAL_BIT,
    NO_TAG,
    OVERFLOW_BIT,
    READ_BIT,
    STATUS_BIT,
    TRANSIT_BIT,
    UNDERFLOW_BIT,
    WRITE_BIT,
    Asc,
    LoginStatus,
    LogoutReason,
    LogoutResponse,
    Opcode,
    RejectReason,
    SenseKey,
    Stage,
    Status,
    TaskResponse,
)
from .negotiation import (
    DEFAULT_MAX_RECV_DATA_SEGMENT,
    LOGIN_MAX_RECV_DATA_SEGMENT,
    TARGET_PORTAL_GROUP_TAG,
    ChapAuthenticator,
    ChapCredentials,
    NegotiationError,
    SessionParameters,
    negotiate_operational,
)
from .pdu import (
    Buffer,
    Pdu,
    PduError,
    PduReader,
    build_bhs,
    digest_bytes,
    encode,
    format_text,
    pack_bhs,
    parse_text,
)
from .sense import fixed_sense
from .session import Session, SessionTable, WindowOverflow, sn_add

_PADDING = (b"", b"\0", b"\0\0", b"\0\0\0")
# A SCSI Command BHS's fields the core reads: opcode byte (I bit), flags, LUN, ITT, Expected
# Data Transfer Length, CmdSN (RFC 7143 11.3).
_COMMAND_FIELDS = struct.Struct(">BB6xQIII")
# A Data-Out BHS from byte 16: ITT, TTT, reserved, ExpStatSN, reserved, DataSN, Buffer Offset.
_DATA_OUT_FIELDS = struct.Struct(">7I")
QUEUE_DEPTH = 64  # commands an initiator may have outstanding (the CmdSN window)
MAX_TRANSFER = 32 * 1024 * 1024  # largest Expected Data Transfer Length accepted for a write
MAX_TEXT_BYTES = 64 * 1024  # a Login or Text request's keys, across continuation PDUs
MAX_LOGIN_PDUS = 32  # login requests one connection may send before it must be in full feature
MAX_SOLICITED_BYTES = 64 * 1024 * 1024  # write data a connection may be asked for at once (R2T)
# A write command whose immediate data is at least 1/4 of its transfer gets its whole buffer at
# once (libiscsi: 256 KiB immediate of a 1 MiB write).  What commands waiting in the CmdSN
# window can pin that way is 4 times the immediate data they sent, at most
# QUEUE_DEPTH * 4 * FirstBurstLength (64 MiB at the 256 KiB the target accepts).
PREALLOCATE_FACTOR = 4


class Phase(enum.Enum):
    LOGIN = 1
    FULL_FEATURE = 2
    CLOSED = 3


class SessionType(enum.Enum):
    NORMAL = "Normal"
    DISCOVERY = "Discovery"


# --- events ----------------------------------------------------------------------------------


@dataclass(slots=True)
class LoginComplete:
    session_type: SessionType
    initiator_name: str
    target_name: str | None
    isid: int
    tsih: int
    initiator_alias: str = ""
    leading: bool = True  # False: a connection added to an existing session (MC/S)
    cid: int = 0


@dataclass(slots=True, eq=False)
class ScsiCommand:
    """One SCSI task.  ``data`` is the Data-Out (None for commands without it)."""

    itt: int
    lun: int
    cdb: bytes
    expected_length: int
    read: bool
    write: bool
    cmdsn: int
    immediate: bool
    attribute: int
    data: bytearray | None = None
    # collection state (the core's)
    received: int = 0
    unsolicited_done: bool = True
    r2t_outstanding: bool = False  # the current burst (ttt, burst_end, data_sn) answers an R2T
    r2t_sn: int = 0
    # R2Ts sent after the current one's (MaxOutstandingR2T > 1): (TTT, burst end) in offset
    # order, answered in that order (DataSequenceInOrder=Yes); and how far R2Ts have asked.
    r2ts_ahead: list[tuple[int, int]] = field(default_factory=list)
    solicited: int = 0
    ttt: int = NO_TAG
    data_sn: int = 0  # DataSN expected on the next Data-Out of the current sequence
    burst_end: int = 0
    aborted: bool = False
    budgeted: bool = False  # holds expected_length bytes of the connection's R2T budget
    responses_sent: int = 0  # Data-In and R2T PDUs: the response's ExpDataSN


@dataclass(slots=True)
class TaskManagement:
    itt: int
    function: int
    lun: int
    referenced_itt: int
    refcmdsn: int
    immediate: bool


@dataclass(slots=True)
class LogoutRequested:
    itt: int
    reason: int
    cid: int


@dataclass(slots=True)
class ConnectionClosed:
    reason: str
    clean: bool


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
Event = LoginComplete | ScsiCommand | TaskManagement | LogoutRequested | ConnectionClosed | _NeedData


@dataclass(slots=True)
class ScsiResult:
    """What the SCSI layer answers: status, Data-In, sense, and how many bytes the command
    wanted to move (for the residual count; None: the length of ``data``).  A read with GOOD
    status may give its Data-In as ``spans`` instead of ``data``: FileSpans (blockdev.py) in
    order, which the core puts in its output as they are, after each Data-In header, for the
    server to ``sendfile`` (only on a connection without DataDigest: the CRC needs the bytes)."""

    status: int = Status.GOOD
    data: Buffer = b""
    sense: bytes = b""
    wanted: int | None = None
    spans: list[FileSpan] | None = None


@dataclass(frozen=True, slots=True)
class LoginPolicy:
    """What the core asks the server while logging in.

    ``target_names(initiator)`` lists the targets that initiator may see (SendTargets);
    ``authorize(target, initiator)`` is SUCCESS, NOT_FOUND or AUTHORIZATION_FAILED;
    ``credentials(target)`` is the CHAP secrets a login must prove, or None (no
    authentication); ``target_alias(target)`` the TargetAlias; ``portal`` is "HOST:PORT" of
    this connection's listening address; ``sessions`` the server's live sessions (one table
    shared by all its connections: a Login with a TSIH joins one of them)."""

    target_names: Callable[[str], list[str]]
    authorize: Callable[[str, str], LoginStatus]
    credentials: Callable[[str | None], ChapCredentials | None]
    portal: str
    target_alias: Callable[[str], str] = lambda name: ""
    sessions: SessionTable = field(default_factory=SessionTable)


class TargetConnection:
    """The target side of one iSCSI connection."""

    def __init__(self, policy: LoginPolicy, *, queue_depth: int = QUEUE_DEPTH) -> None:
        self.policy = policy
        self.phase = Phase.LOGIN
        self.params = SessionParameters()
        self.reader = PduReader(LOGIN_MAX_RECV_DATA_SEGMENT)
        self.reader.sink = self._data_sink
        self.queue_depth = queue_depth
        self._events: list[Event] = []
        self._out: list[Buffer | FileSpan] = []
        self.session_type = SessionType.NORMAL
        self.initiator_name = ""
        self.initiator_alias = ""
        self.target_name: str | None = None
        self.isid = 0
        self.tsih = 0
        self.cid = 0
        self.stat_sn = 1
        # Until the first Login Request says otherwise, a session of this connection alone.
        self.session = Session(
            initiator_name="", isid=0, target_name=None, cmd_sn=0, queue_depth=queue_depth, params=self.params
        )
        self.leading = True
        self._join_tsih = 0  # the TSIH a Login named: add this connection to that session
        self._login_stage = Stage.SECURITY
        self._login_started = False
        self._login_text = bytearray()
        self._login_pdus = 0
        self._authenticated = False
        self._chap: ChapAuthenticator | None = None
        self._security_done = False
        self._text_in = bytearray()
        self._text_out: bytes = b""
        self._text_ttt = 0
        self._next_ttt = 1
        self.tasks: dict[int, ScsiCommand] = {}  # by ITT: collecting data or executing
        self._discard: set[int] = set()  # ITTs whose unsolicited Data-Out is dropped
        self._budget_used = 0
        self._r2t_waiting: list[ScsiCommand] = []
        self._closed_reason: str | None = None
        self.pdus_in = 0
        self.ping_ttt: int | None = None  # a NOP-In ping waiting for its NOP-Out answer

    # --- I/O ------------------------------------------------------------------------------------
    def receive_data(self, data: Buffer) -> None:
        """Bytes from the peer; ``b""`` is end of stream."""
        if self.phase is Phase.CLOSED:
            return
        if not data:
            clean = self.phase is Phase.FULL_FEATURE and not self.tasks
            self._close("the initiator closed the connection", clean=clean)
            return
        self.reader.feed(data)
        self._process()

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes from the peer go (asyncio BufferedProtocol): the receive
        buffer, or the buffer of the write whose Data-Out is arriving."""
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        """``nbytes`` from the peer were put where ``get_buffer`` said."""
        if self.phase is Phase.CLOSED:
            return
        self.reader.buffer_updated(nbytes)
        self._process()

    def _data_sink(self, bhs: bytes) -> memoryview | None:
        """The reader's sink: where a long data segment goes, once its header is in.  A
        Data-Out's: the write's own buffer at its offset, when the PDU answers the task's R2T
        as expected (anything else takes the copy path, and ``_data_out`` judges it whole).
        A write command's immediate data: a new buffer for the write, allocated whole when
        the immediate data is at least 1/PREALLOCATE_FACTOR of the transfer (so that the
        Data-Out after it lands there too, and nothing is copied into a larger buffer later),
        else of the immediate data's length; ``_scsi_command`` judges the command."""
        if self.phase is not Phase.FULL_FEATURE:
            return None
        opcode = bhs[0] & 0x3F
        if opcode == Opcode.SCSI_COMMAND:
            dsl = int.from_bytes(bhs[5:8], "big")
            edtl = int.from_bytes(bhs[20:24], "big")
            if not bhs[1] & WRITE_BIT or dsl > edtl:
                return None
            whole = edtl if edtl <= min(MAX_TRANSFER, PREALLOCATE_FACTOR * dsl) else dsl
            return memoryview(bytearray(whole))[:dsl]
        if opcode != Opcode.SCSI_DATA_OUT:
            return None
        itt, ttt, _, _, _, data_sn, offset = _DATA_OUT_FIELDS.unpack_from(bhs, 16)
        task = self.tasks.get(itt)
        if task is None or not task.r2t_outstanding or ttt != task.ttt or ttt == NO_TAG:
            return None
        data = task.data
        end = offset + int.from_bytes(bhs[5:8], "big")
        if data is None or offset != task.received or data_sn != task.data_sn or end > task.burst_end:
            return None
        if len(data) < end:
            return None  # not allocated whole (see _advance_write)
        return memoryview(data)[offset:end]

    def next_event(self) -> Event:
        if self._events:
            return self._events.pop(0)
        return NEED_DATA

    def data_to_send(self) -> list[Buffer | FileSpan]:
        """What to send, in order: bytes, and the FileSpans of Data-In answered with spans."""
        out = self._out
        self._out = []
        return out

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def in_full_feature(self) -> bool:
        return self.phase is Phase.FULL_FEATURE

    @property
    def exp_cmd_sn(self) -> int:
        return self.session.exp_cmd_sn

    @property
    def max_cmd_sn(self) -> int:
        return self.session.max_cmd_sn

    def running_tasks(self) -> int:
        """Tasks that hold a place in the command window, not yet answered.  Immediate ones
        are counted too (they are rare; counting them only keeps the window smaller, which
        the target may always do), so that this is a len(), not a walk, per PDU sent."""
        return len(self.tasks)

    def end(self, reason: str, *, clean: bool) -> None:
        """Close this connection from outside (its session ended, a reinstatement)."""
        for itt in list(self.tasks):
            self.abort(itt)
        self._close(reason, clean=clean)

    # --- internals -------------------------------------------------------------------------------
    def _close(self, reason: str, *, clean: bool = False) -> None:
        if self.phase is Phase.CLOSED:
            return
        member = self.phase is Phase.FULL_FEATURE
        self.phase = Phase.CLOSED
        self._closed_reason = reason
        self._events.append(ConnectionClosed(reason, clean))
        if not member:
            return
        session = self.session
        session.leave(self)
        if not clean:
            # ERL 0: "session recovery" is the only recovery; the other connections end too.
            session.failed(self, reason)
        if session.ended:
            self.policy.sessions.remove(session)

    def _send(self, bhs: bytearray, data: Buffer = b"") -> None:
        self._out.extend(
            encode(bhs, data, header_digest=self.reader.header_digest, data_digest=self.reader.data_digest)
        )

    def _send_packed(self, header: bytes, data: Buffer = b"") -> None:
        """The data path's ``_send``: ``header`` from ``pack_bhs`` with its DataSegmentLength
        set; without digests the pieces go out as they are (no copy of the BHS or data)."""
        if self.reader.header_digest or self.reader.data_digest:
            self._send(bytearray(header), data)
            return
        out = self._out
        out.append(header)
        if data:
            out.append(data)
            pad = -len(data) & 3
            if pad:
                out.append(_PADDING[pad])

    def _send_answer(self, opcode: Opcode, code: int, itt: int, data: Buffer = b"") -> None:
        """A Reject, Task Management or Logout Response: the code in byte 2, the next StatSN
        and the command window (RFC 7143 11.6, 11.15, 11.17); the rest of the BHS zero (for a
        Logout Response, Time2Wait and Time2Retain 0: nothing to retain at ERL 0)."""
        bhs = build_bhs(
            opcode,
            FINAL_BIT,
            byte2=code,
            itt=itt,
            fields=(0, self.stat_sn, self.exp_cmd_sn, self._advertised_max(), 0, 0, 0),
        )
        self.stat_sn = sn_add(self.stat_sn, 1)
        self._send(bhs, data)

    def _reject(self, reason: RejectReason, header: bytes) -> None:
        self._send_answer(Opcode.REJECT, int(reason), NO_TAG, header[:BHS_LENGTH])

    def _protocol_error(self, reason: str, header: bytes | None = None) -> None:
        if self.phase is Phase.FULL_FEATURE and header is not None:
            self._reject(RejectReason.PROTOCOL_ERROR, header)
        self._close(f"protocol error: {reason}")

    def _advertised_max(self) -> int:
        return self.session.advertised_max()

    def _process(self) -> None:
        while self.phase is not Phase.CLOSED:
            try:
                pdu = self.reader.next_pdu()
            except PduError as exc:
                if (
                    exc.digest
                    and self.phase is Phase.FULL_FEATURE
                    and exc.header is not None
                    and "data digest" in exc.reason
                ):
                    # ERL 0: say why (Reject, reason data digest error), then close.
                    self._reject(RejectReason.DATA_DIGEST_ERROR, exc.header)
                self._close(exc.reason)
                return
            if pdu is None:
                return
            self.pdus_in += 1
            if self.phase is Phase.LOGIN:
                self._login(pdu)
            else:
                self._full_feature(pdu)

    # --- login -------------------------------------------------------------------------------------
    def _login_response(
        self,
        pdu: Pdu,
        *,
        transit: bool,
        nsg: int,
        status: LoginStatus = LoginStatus.SUCCESS,
        pairs: list[tuple[str, str]] | None = None,
        cont: bool = False,
    ) -> None:
        csg = (pdu.flags >> 2) & 3
        flags = (TRANSIT_BIT if transit else 0) | (CONTINUE_BIT if cont else 0) | (csg << 2)
        if transit:
            flags |= nsg
        bhs = build_bhs(
            Opcode.LOGIN_RESPONSE,
            flags,
            byte2=0,  # Version-max
            byte3=0,  # Version-active
            itt=pdu.itt,
            fields=(
                0,
                self.stat_sn,
                self.exp_cmd_sn,
                self._advertised_max(),
                int(status) << 16,
                0,
                0,
            ),
        )
        bhs[8:14] = pdu.bhs[8:14]  # ISID
        bhs[14:16] = self.tsih.to_bytes(2, "big")
        self.stat_sn = sn_add(self.stat_sn, 1)
        # Login responses never carry digests: they take effect after the login.
        self._out.extend(encode(bhs, format_text(pairs or [])))

    def _login_fail(self, pdu: Pdu, status: LoginStatus, reason: str) -> None:
        self._login_response(pdu, transit=False, nsg=0, status=status)
        self._close(f"login failed: {reason}")

    def _login(self, pdu: Pdu) -> None:
        if pdu.opcode != Opcode.LOGIN_REQUEST:
            # "Any PDU other than a Login Request during the login phase" -> invalid during login.
            self._login_fail(pdu, LoginStatus.INVALID_DURING_LOGIN, f"opcode 0x{pdu.opcode:02x} during login")
            return
        self._login_pdus += 1
        if self._login_pdus > MAX_LOGIN_PDUS:
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR, "too many login requests")
            return
        flags = pdu.flags
        transit = bool(flags & TRANSIT_BIT)
        cont = bool(flags & CONTINUE_BIT)
        csg = (flags >> 2) & 3
        nsg = flags & 3
        if transit and cont:
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR, "T and C both set")
            return
        if pdu.bhs[3] > 0 or pdu.bhs[2] < 0:  # Version-min must be 0 (the only version)
            self._login_fail(pdu, LoginStatus.UNSUPPORTED_VERSION, "unsupported version")
            return
        if csg == 2 or (transit and (nsg == 2 or (nsg <= csg and not (csg == nsg == 0)))):
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR, f"invalid stage transition {csg}->{nsg}")
            return
        if not self._login_started:
            self._login_started = True
            self.isid = int.from_bytes(pdu.bhs[8:14], "big")
            self.cid = pdu.u16(20)
            self.stat_sn = pdu.u32(28) or 1
            self._join_tsih = pdu.u16(14)
            self.session = Session(
                initiator_name="",
                isid=self.isid,
                target_name=None,
                cmd_sn=pdu.u32(24),
                queue_depth=self.queue_depth,
                params=self.params,
            )
        elif int.from_bytes(pdu.bhs[8:14], "big") != self.isid:
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR, "ISID changed during login")
            return
        self._login_text += pdu.data
        if len(self._login_text) > MAX_TEXT_BYTES:
            self._login_fail(pdu, LoginStatus.OUT_OF_RESOURCES, "login text too long")
            return
        if cont:
            # "the target MUST answer a Login Request with C=1 with an empty Login Response"
            self._login_response(pdu, transit=False, nsg=0)
            return
        try:
            pairs = parse_text(self._login_text)
        except (ValueError, UnicodeDecodeError) as exc:
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR, f"malformed login text: {exc}")
            return
        self._login_text = bytearray()
        keys = dict(pairs)
        out: list[tuple[str, str]] = []
        if self._login_pdus == 1 or not self.initiator_name:
            name = keys.get("InitiatorName")
            if not name:
                self._login_fail(pdu, LoginStatus.MISSING_PARAMETER, "no InitiatorName")
                return
            self.initiator_name = name
            self.initiator_alias = keys.get("InitiatorAlias", "")
            kind = keys.get("SessionType", "Normal")
            if kind not in ("Normal", "Discovery"):
                self._login_fail(pdu, LoginStatus.SESSION_TYPE_NOT_SUPPORTED, f"SessionType {kind}")
                return
            self.session_type = SessionType(kind)
            if self.session_type is SessionType.NORMAL:
                target = keys.get("TargetName")
                if not target:
                    self._login_fail(pdu, LoginStatus.MISSING_PARAMETER, "no TargetName")
                    return
                verdict = self.policy.authorize(target, name)
                if verdict is not LoginStatus.SUCCESS:
                    self._login_fail(pdu, verdict, f"target {target!r} for {name!r}: {verdict.name}")
                    return
                self.target_name = target
                alias = self.policy.target_alias(target)
                if alias:
                    out.append(("TargetAlias", alias))
            if self._join_tsih and not self._join_session(pdu):
                return
            if self.leading:
                self.session.initiator_name = name
                self.session.target_name = self.target_name
            out.append(("TargetPortalGroupTag", str(TARGET_PORTAL_GROUP_TAG)))
        credentials = self.policy.credentials(self.target_name)
        if csg == Stage.SECURITY:
            auth_out, finished = self._security(pdu, keys, credentials)
            if auth_out is None:
                return
            out += auth_out
            if not finished:
                self._login_response(pdu, transit=False, nsg=0, pairs=out)
                return
            self._security_done = True
        else:
            if credentials is not None and not self._security_done:
                self._login_fail(pdu, LoginStatus.AUTHENTICATION_FAILED, "authentication required")
                return
            try:
                out += negotiate_operational(
                    pairs,
                    self.params,
                    discovery=self.session_type is SessionType.DISCOVERY,
                    leading=self.leading,
                )
            except NegotiationError as exc:
                self._login_fail(pdu, LoginStatus.INITIATOR_ERROR, str(exc))
                return
            if "MaxRecvDataSegmentLength" not in self.params.declared - {"sent"}:
                pass
            if "sent" not in self.params.declared:
                # Declarative: the target tells its own receive limit once.
                out.append(("MaxRecvDataSegmentLength", str(self.params.target_max_recv_data_segment)))
                self.params.declared.add("sent")
        if not transit:
            self._login_response(pdu, transit=False, nsg=0, pairs=out)
            return
        if nsg == Stage.FULL_FEATURE:
            self._enter_full_feature(pdu, out)
        else:
            self._login_response(pdu, transit=True, nsg=nsg, pairs=out)

    def _join_session(self, pdu: Pdu) -> bool:
        """A Login with a TSIH adds this connection to that session (RFC 7143 6.3.2: the
        same initiator, ISID and target); False after failing the login."""
        session = self.policy.sessions.find(self.initiator_name, self.isid, self._join_tsih)
        if (
            session is None
            or session.target_name != self.target_name
            or self.session_type is not SessionType.NORMAL
        ):
            self._login_fail(
                pdu, LoginStatus.SESSION_DOES_NOT_EXIST, "no such session to add a connection to"
            )
            return False
        if len(session.connections) >= session.max_connections and self.cid not in session.connections:
            self._login_fail(
                pdu,
                LoginStatus.TOO_MANY_CONNECTIONS,
                f"the session has its {session.max_connections} connection(s) (MaxConnections)",
            )
            return False
        self.session = session
        self.leading = False
        self.tsih = session.tsih
        # The session's values stand; only the connection's own keys are negotiated again.
        self.params = replace(
            session.params,
            header_digest=False,
            data_digest=False,
            initiator_max_recv_data_segment=DEFAULT_MAX_RECV_DATA_SEGMENT,
            declared=set(),
        )
        return True

    def _security(
        self, pdu: Pdu, keys: dict[str, str], credentials: ChapCredentials | None
    ) -> tuple[list[tuple[str, str]] | None, bool]:
        """The security stage; returns (pairs, finished), or (None, _) after failing the login."""
        out: list[tuple[str, str]] = []
        if self._chap is None:
            methods = keys.get("AuthMethod")
            if methods is None and not self._security_done:
                if credentials is not None:
                    self._login_fail(pdu, LoginStatus.AUTHENTICATION_FAILED, "no AuthMethod offered")
                    return None, False
                return out, True
            offered = (methods or "None").split(",")
            if credentials is not None:
                if "CHAP" not in offered:
                    self._login_fail(pdu, LoginStatus.AUTHENTICATION_FAILED, "CHAP required, not offered")
                    return None, False
                self._chap = ChapAuthenticator(credentials)
                out.append(("AuthMethod", "CHAP"))
                if "CHAP_A" not in keys:
                    return out, False
            else:
                if "None" not in offered:
                    self._login_fail(pdu, LoginStatus.AUTHENTICATION_FAILED, "no acceptable AuthMethod")
                    return None, False
                out.append(("AuthMethod", "None"))
                return out, True
        try:
            chap_out, finished = self._chap.step(keys)
        except NegotiationError as exc:
            self._login_fail(pdu, LoginStatus.AUTHENTICATION_FAILED, str(exc))
            return None, False
        out += chap_out
        if finished:
            self._authenticated = True
            return out, True
        if pdu.flags & TRANSIT_BIT:
            # The initiator may not leave the security stage before CHAP finished; answer
            # without T so it carries on.
            pass
        return out, False

    def _enter_full_feature(self, pdu: Pdu, out: list[tuple[str, str]]) -> None:
        if self.session_type is SessionType.NORMAL and self.target_name is None:
            self._login_fail(pdu, LoginStatus.MISSING_PARAMETER, "no TargetName")
            return
        credentials = self.policy.credentials(self.target_name)
        if credentials is not None and not self._authenticated:
            self._login_fail(pdu, LoginStatus.AUTHENTICATION_FAILED, "authentication required")
            return
        if "sent" not in self.params.declared:
            out.append(("MaxRecvDataSegmentLength", str(self.params.target_max_recv_data_segment)))
            self.params.declared.add("sent")
        session = self.session
        if self.leading:
            self.tsih = session.tsih = self.policy.sessions.new_tsih()
            self.policy.sessions.add(session)
        elif session.ended or (
            len(session.connections) >= session.max_connections and self.cid not in session.connections
        ):
            self._login_fail(pdu, LoginStatus.SESSION_DOES_NOT_EXIST, "the session ended during the login")
            return
        self._login_response(pdu, transit=True, nsg=Stage.FULL_FEATURE, pairs=out)
        self.phase = Phase.FULL_FEATURE
        session.join(self)
        # Digests and segment limits apply from the first PDU after the final login response.
        self.reader.header_digest = self.params.header_digest
        self.reader.data_digest = self.params.data_digest
        self.reader.max_data_segment = self.params.target_max_recv_data_segment
        self._events.append(
            LoginComplete(
                self.session_type,
                self.initiator_name,
                self.target_name,
                self.isid,
                self.tsih,
                self.initiator_alias,
                leading=self.leading,
                cid=self.cid,
            )
        )

    # --- full feature phase ---------------------------------------------------------------------------
    def _full_feature(self, pdu: Pdu) -> None:
        op = pdu.opcode
        if op == Opcode.SCSI_DATA_OUT:
            self._data_out(pdu)
            return
        if op == Opcode.LOGIN_REQUEST:
            self._protocol_error("login request in full feature phase", pdu.bhs)
            return
        if op == Opcode.SNACK_REQUEST:
            # Error recovery level 0 has no SNACK.
            self._reject(RejectReason.SNACK_REJECT, pdu.bhs)
            return
        if self.session_type is SessionType.DISCOVERY and op not in (
            Opcode.TEXT_REQUEST,
            Opcode.LOGOUT_REQUEST,
            Opcode.NOP_OUT,
        ):
            self._protocol_error("a discovery session carries only Text, NOP and Logout", pdu.bhs)
            return
        immediate = pdu.immediate
        cmdsn = pdu.u32(24)
        if op == Opcode.NOP_OUT and pdu.itt == NO_TAG and not immediate:
            # "a NOP-Out ... with the ITT 0xffffffff ... MUST have the I bit set"
            pass
        if immediate:
            self.dispatch(pdu)
            return
        # Non-immediate: in CmdSN order across the session's connections, inside the window.
        try:
            self.session.order(self, pdu, cmdsn)
        except WindowOverflow:
            self._protocol_error("CmdSN gap too large", pdu.bhs)

    def dispatch(self, pdu: Pdu) -> None:
        """Run a request whose turn came (called by the session, maybe for another
        connection's input)."""
        if self.phase is not Phase.FULL_FEATURE:
            return
        op = pdu.opcode
        if op == Opcode.SCSI_COMMAND:
            self._scsi_command(pdu)
        elif op == Opcode.NOP_OUT:
            self._nop_out(pdu)
        elif op == Opcode.TEXT_REQUEST:
            self._text(pdu)
        elif op == Opcode.TASK_MGMT_REQUEST:
            self._events.append(
                TaskManagement(
                    itt=pdu.itt,
                    function=pdu.flags & 0x7F,
                    lun=pdu.lun,
                    referenced_itt=pdu.u32(20),
                    refcmdsn=pdu.u32(32),
                    immediate=pdu.immediate,
                )
            )
        elif op == Opcode.LOGOUT_REQUEST:
            self._events.append(LogoutRequested(pdu.itt, pdu.flags & 0x7F, pdu.u16(20)))
        else:
            self._reject(RejectReason.COMMAND_NOT_SUPPORTED, pdu.bhs)

    def _nop_out(self, pdu: Pdu) -> None:
        if pdu.itt == NO_TAG:
            # A ping answer ("the NOP-Out ... MUST ... copy the Target Transfer Tag", RFC 7143
            # 11.18.3) or a CmdSN update: no reply.
            if self.ping_ttt is not None and pdu.u32(20) == self.ping_ttt:
                self.ping_ttt = None
            return
        bhs = build_bhs(
            Opcode.NOP_IN,
            FINAL_BIT,
            lun=pdu.lun,
            itt=pdu.itt,
            fields=(NO_TAG, self.stat_sn, self.exp_cmd_sn, self._advertised_max(), 0, 0, 0),
        )
        self.stat_sn = sn_add(self.stat_sn, 1)
        # "the data segment ... is returned" (ping data), bounded by what the initiator accepts
        self._send(bhs, pdu.data[: self.params.initiator_max_recv_data_segment])

    # --- text -------------------------------------------------------------------------------------
    def _text(self, pdu: Pdu) -> None:
        ttt = pdu.u32(20)
        if ttt != NO_TAG and self._text_out and ttt == self._text_ttt:
            self._send_text_piece(pdu)
            return
        self._text_out = b""
        self._text_in += pdu.data
        if len(self._text_in) > MAX_TEXT_BYTES:
            self._protocol_error("text request too long", pdu.bhs)
            return
        if pdu.flags & CONTINUE_BIT:
            self._text_response(pdu, b"", final=False, cont=False, ttt=self._new_ttt())
            return
        try:
            pairs = parse_text(self._text_in)
        except (ValueError, UnicodeDecodeError) as exc:
            self._text_in = bytearray()
            self._protocol_error(f"malformed text request: {exc}", pdu.bhs)
            return
        self._text_in = bytearray()
        out: list[tuple[str, str]] = []
        for key, value in pairs:
            if key == "SendTargets":
                out += self._send_targets(value)
            else:
                try:
                    out += negotiate_operational([(key, value)], SessionParameters(), discovery=False)
                except NegotiationError:
                    out.append((key, "Reject"))
        self._text_out = format_text(out)
        self._send_text_piece(pdu)

    def _send_targets(self, value: str) -> list[tuple[str, str]]:
        if value == "All":
            names = self.policy.target_names(self.initiator_name)
        elif value == "" or value == self.target_name:
            if self.session_type is SessionType.DISCOVERY:
                return []
            names = [self.target_name] if self.target_name else []
        else:
            names = [n for n in self.policy.target_names(self.initiator_name) if n == value]
        out: list[tuple[str, str]] = []
        for name in names:
            out.append(("TargetName", name))
            out.append(("TargetAddress", f"{self.policy.portal},{TARGET_PORTAL_GROUP_TAG}"))
        return out

    def _new_ttt(self) -> int:
        ttt = self._next_ttt
        self._next_ttt = self._next_ttt + 1 if self._next_ttt < 0x7FFFFFFF else 1
        return ttt

    def _send_text_piece(self, pdu: Pdu) -> None:
        limit = self.params.initiator_max_recv_data_segment
        piece, rest = self._text_out[:limit], self._text_out[limit:]
        self._text_out = rest
        if rest:
            self._text_ttt = self._new_ttt()
            self._text_response(pdu, piece, final=False, cont=True, ttt=self._text_ttt)
        else:
            self._text_response(pdu, piece, final=True, cont=False, ttt=NO_TAG)

    def _text_response(self, pdu: Pdu, data: bytes, *, final: bool, cont: bool, ttt: int) -> None:
        flags = (FINAL_BIT if final else 0) | (CONTINUE_BIT if cont else 0)
        bhs = build_bhs(
            Opcode.TEXT_RESPONSE,
            flags,
            lun=pdu.lun,
            itt=pdu.itt,
            fields=(ttt, self.stat_sn, self.exp_cmd_sn, self._advertised_max(), 0, 0, 0),
        )
        self.stat_sn = sn_add(self.stat_sn, 1)
        self._send(bhs, data)

    # --- SCSI commands and data ------------------------------------------------------------------------
    def _scsi_command(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        opcode_byte, flags, lun, itt, edtl, cmdsn = _COMMAND_FIELDS.unpack_from(bhs)
        if itt == NO_TAG:
            self._protocol_error("a SCSI command with the reserved ITT", pdu.bhs)
            return
        if itt in self.tasks:
            self._reject(RejectReason.TASK_IN_PROGRESS, pdu.bhs)
            return
        read = bool(flags & READ_BIT)
        write = bool(flags & WRITE_BIT)
        cdb = bhs[32:48]
        if pdu.ahs:
            # Extended CDB AHS (type 1): the CDB continues there.
            ahs = pdu.ahs
            if len(ahs) >= 4 and ahs[2] == 1:
                length = int.from_bytes(ahs[0:2], "big")
                cdb = cdb + ahs[4 : 3 + length]
        immediate_data = pdu.data
        task = ScsiCommand(
            itt, lun, bytes(cdb), edtl, read, write, cmdsn, bool(opcode_byte & 0x40), flags & 7
        )
        if immediate_data and (not write or not self.params.immediate_data):
            self._protocol_error("immediate data the session does not allow", pdu.bhs)
            return
        if write:
            if len(immediate_data) > min(edtl, self.params.first_burst_length):
                self._protocol_error("immediate data longer than FirstBurstLength or the transfer", pdu.bhs)
                return
            unsolicited_follows = not (flags & FINAL_BIT)
            if unsolicited_follows and self.params.initial_r2t:
                self._protocol_error("unsolicited data with InitialR2T=Yes", pdu.bhs)
                return
            if edtl > MAX_TRANSFER:
                # Refuse before soliciting anything (the memory a write may pin is bounded);
                # unsolicited Data-Out that follows is dropped.
                if unsolicited_follows:
                    self._discard.add(itt)
                self.tasks[itt] = task
                self.complete(
                    task,
                    ScsiResult(
                        Status.CHECK_CONDITION,
                        sense=fixed_sense(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB),
                        wanted=0,
                    ),
                )
                return
            # Grown as data arrives (DataPDUInOrder=Yes: always at the end), never allocated
            # up front: what a connection holds is what it sent, within the R2T budget --
            # except immediate data received in place (_data_sink): its buffer, maybe whole.
            if pdu.in_place:
                assert isinstance(immediate_data, memoryview) and isinstance(immediate_data.obj, bytearray)
                task.data = immediate_data.obj
            else:
                task.data = bytearray(immediate_data)
            n = len(immediate_data)
            task.received = n
            task.unsolicited_done = not unsolicited_follows
            # unsolicited data ends at FirstBurstLength
            task.burst_end = min(edtl, self.params.first_burst_length) if unsolicited_follows else n
            self.tasks[itt] = task
            self._advance_write(task)
            return
        self.tasks[itt] = task
        self._events.append(task)

    def _advance_write(self, task: ScsiCommand) -> None:
        """Unsolicited data done and the current burst complete: the task is ready, or the
        next R2T already sent becomes the current burst, and R2Ts are sent for what is not
        asked yet, up to MaxOutstandingR2T of them (RFC 7143 13.17: per task, the current
        one included; with libiscsi's 1, the next burst is asked when the last is in)."""
        if not task.unsolicited_done or task.r2t_outstanding:
            return
        assert task.data is not None
        if task.received >= task.expected_length:
            self._events.append(task)
            return
        if task.r2ts_ahead:
            task.ttt, task.burst_end = task.r2ts_ahead.pop(0)
            task.r2t_outstanding = True
            task.data_sn = 0
            self._solicit(task)
            return
        if not task.budgeted:
            # Solicited data is bounded per connection: a task gets its first R2T only when its
            # whole transfer fits in the budget (or no other task holds any of it).
            if self._budget_used and self._budget_used + task.expected_length > MAX_SOLICITED_BYTES:
                if task not in self._r2t_waiting:
                    self._r2t_waiting.append(task)
                return
            task.budgeted = True
            self._budget_used += task.expected_length
            # Now that the budget holds the whole transfer, the buffer is allocated whole, so
            # that solicited Data-Out is received straight into it (the reader's sink) rather
            # than copied three times (receive buffer, segment, growing buffer): 25% less CPU
            # per 1 MiB write.  The memory a connection may hold is the budget either way (it
            # could always send all but the last byte of each budgeted write).  Not an
            # anonymous map, whose pages would come zeroed only when written: a page fault
            # per 4 KiB made a 1 MiB buffer cost 5 ms here, a bytearray 0.16 ms.
            data = task.data
            if len(data) < task.expected_length:
                whole = bytearray(task.expected_length)
                whole[: len(data)] = data
                task.data = whole
        task.solicited = task.received
        self._solicit(task)

    def _solicit(self, task: ScsiCommand) -> None:
        """Send R2Ts from ``task.solicited`` on, MaxBurstLength each, while fewer than
        MaxOutstandingR2T are outstanding; the first becomes the current burst."""
        limit = self.params.max_outstanding_r2t
        edtl = task.expected_length
        while task.solicited < edtl and int(task.r2t_outstanding) + len(task.r2ts_ahead) < limit:
            offset = task.solicited
            length = min(self.params.max_burst_length, edtl - offset)
            ttt = self._new_ttt()
            if task.r2t_outstanding:
                task.r2ts_ahead.append((ttt, offset + length))
            else:
                task.ttt, task.burst_end = ttt, offset + length
                task.r2t_outstanding = True
                task.data_sn = 0
            task.solicited = offset + length
            bhs = build_bhs(
                Opcode.R2T,
                FINAL_BIT,
                lun=task.lun,
                itt=task.itt,
                fields=(
                    ttt,
                    self.stat_sn,
                    self.exp_cmd_sn,
                    self._advertised_max(),
                    task.r2t_sn,
                    offset,
                    length,
                ),
            )
            task.r2t_sn += 1
            task.responses_sent += 1
            self._send(bhs)

    def _data_out(self, pdu: Pdu) -> None:
        itt = pdu.itt
        ttt = pdu.u32(20)
        task = self.tasks.get(itt)
        if (
            task is None
            or task.data is None
            or (
                task.received >= task.expected_length
                and not (task.r2t_outstanding or not task.unsolicited_done)
            )
        ):
            if itt in self._discard and ttt == NO_TAG:
                if pdu.final:
                    self._discard.discard(itt)
                return
            # Data for a task that was aborted or already complete: dropped (RFC 7143 4.2.3.3).
            return
        if ttt == NO_TAG:
            if task.unsolicited_done:
                self._protocol_error("unsolicited Data-Out after the unsolicited burst ended", pdu.bhs)
                return
        elif not task.r2t_outstanding or ttt != task.ttt:
            self._protocol_error("Data-Out with an unknown Target Transfer Tag", pdu.bhs)
            return
        offset = pdu.u32(40)
        data = pdu.data
        n = len(data)
        if offset != task.received:
            self._protocol_error(
                f"Data-Out at offset {offset}, expected {task.received} (DataPDUInOrder=Yes)", pdu.bhs
            )
            return
        if offset + n > task.burst_end:
            self._protocol_error("Data-Out beyond the burst (FirstBurstLength or R2T length)", pdu.bhs)
            return
        data_sn = pdu.u32(36)
        if data_sn != task.data_sn:
            self._protocol_error(f"DataSN {data_sn}, expected {task.data_sn}", pdu.bhs)
            return
        task.data_sn += 1
        if pdu.in_place or not n:
            pass  # received into task.data at this offset (_data_sink)
        elif len(task.data) == offset:
            task.data += data  # unsolicited: the buffer grows as data arrives (at its end)
        else:
            task.data[offset : offset + n] = data  # allocated whole (_advance_write)
        task.received += n
        if pdu.final or task.received == task.burst_end:
            if not pdu.final:
                self._protocol_error("the burst is complete but the F bit is not set", pdu.bhs)
                return
            if task.received != task.burst_end:
                self._protocol_error("F bit before the burst was complete", pdu.bhs)
                return
            if ttt == NO_TAG:
                task.unsolicited_done = True
            else:
                task.r2t_outstanding = False
            task.data_sn = 0
            self._advance_write(task)

    # --- answers from the layer above -------------------------------------------------------------------
    def complete(self, task: ScsiCommand, result: ScsiResult) -> None:
        """Send a task's Data-In and SCSI Response (unless it was aborted)."""
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]
        self._release_budget(task)
        if task.aborted or self.phase is not Phase.FULL_FEATURE:
            return
        if result.spans:
            self._data_in_spans(task, result.spans, result.wanted)
            return
        data = result.data
        wanted = len(data) if result.wanted is None else result.wanted
        edtl = task.expected_length
        residual_flags = 0
        residual = 0
        if wanted > edtl:
            residual_flags = OVERFLOW_BIT
            residual = wanted - edtl
        elif wanted < edtl:
            residual_flags = UNDERFLOW_BIT
            residual = edtl - wanted
        if len(data) > edtl:
            data = memoryview(data)[:edtl]
        good = result.status == Status.GOOD and not result.sense
        session = self.session
        if good and not data:
            # Fast path: a write's (or a command without data's) GOOD status.
            self._send_packed(
                pack_bhs(
                    Opcode.SCSI_RESPONSE,
                    FINAL_BIT | residual_flags,
                    Status.GOOD,
                    0,
                    0,
                    task.itt,
                    0,
                    self.stat_sn,
                    session.exp_cmd_sn,
                    session.advertised_max(),
                    task.responses_sent,
                    0,
                    residual,
                )
            )
            self.stat_sn = (self.stat_sn + 1) & 0xFFFFFFFF
            return
        n = len(data)
        if (
            good
            and task.read
            and n <= self.params.initiator_max_recv_data_segment
            and n <= self.params.max_burst_length
        ):
            # Fast path: a read that fits one Data-In PDU, which carries the status too
            # (RFC 7143 11.7.4: "the S bit ... in the last Data-In PDU" for GOOD status).
            self._send_packed(
                pack_bhs(
                    Opcode.SCSI_DATA_IN,
                    FINAL_BIT | STATUS_BIT | residual_flags,
                    Status.GOOD,
                    n,
                    task.lun,
                    task.itt,
                    NO_TAG,
                    self.stat_sn,
                    session.exp_cmd_sn,
                    session.advertised_max(),
                    0,
                    0,
                    residual,
                ),
                data,
            )
            task.responses_sent += 1
            self.stat_sn = (self.stat_sn + 1) & 0xFFFFFFFF
            return
        data_sn = 0
        if data and task.read:
            view = memoryview(data)
            segment = min(self.params.initiator_max_recv_data_segment, self.params.max_burst_length)
            burst = self.params.max_burst_length
            total = len(view)
            offset = 0
            while offset < total:
                n = min(segment, total - offset, burst - offset % burst)
                last = offset + n >= total
                end_of_burst = last or (offset + n) % burst == 0
                flags = FINAL_BIT if end_of_burst else 0
                stat_sn = 0
                if last and good:
                    flags |= STATUS_BIT | residual_flags
                    stat_sn = self.stat_sn
                bhs = build_bhs(
                    Opcode.SCSI_DATA_IN,
                    flags,
                    byte3=int(result.status) if flags & STATUS_BIT else 0,
                    lun=task.lun,
                    itt=task.itt,
                    fields=(
                        NO_TAG,
                        stat_sn,
                        self.exp_cmd_sn,
                        self._advertised_max(),
                        data_sn,
                        offset,
                        residual if flags & STATUS_BIT else 0,
                    ),
                )
                self._send(bhs, view[offset : offset + n])
                data_sn += 1
                offset += n
            task.responses_sent += data_sn
            if good:
                self.stat_sn = sn_add(self.stat_sn, 1)
                return
        sense = result.sense
        segment_data = (len(sense).to_bytes(2, "big") + sense) if sense else b""
        bhs = build_bhs(
            Opcode.SCSI_RESPONSE,
            FINAL_BIT | residual_flags,
            byte2=0,  # command completed at target
            byte3=int(result.status),
            lun=0,
            itt=task.itt,
            fields=(
                0,
                self.stat_sn,
                self.exp_cmd_sn,
                self._advertised_max(),
                task.responses_sent,
                0,
                residual,
            ),
        )
        self.stat_sn = sn_add(self.stat_sn, 1)
        self._send(bhs, segment_data)

    def _data_in_spans(self, task: ScsiCommand, spans: list[FileSpan], wanted: int | None) -> None:
        """A read's GOOD answer whose data lies in files: the Data-In PDUs as ``complete``
        makes them (segments of MaxRecvDataSegmentLength, the F bit at each MaxBurstLength,
        the status in the last), each header followed by the FileSpans of its segment --
        split where a segment ends inside one -- instead of the bytes."""
        assert not self.reader.data_digest, "DataDigest needs the bytes: no spans (server.py)"
        total = sum(span.length for span in spans)
        wanted = total if wanted is None else wanted
        edtl = task.expected_length
        total = min(total, edtl)
        residual_flags = 0
        residual = 0
        if wanted > edtl:
            residual_flags, residual = OVERFLOW_BIT, wanted - edtl
        elif wanted < edtl:
            residual_flags, residual = UNDERFLOW_BIT, edtl - wanted
        params = self.params
        burst = params.max_burst_length
        segment = min(params.initiator_max_recv_data_segment, burst)
        header_digest = self.reader.header_digest
        session = self.session
        out = self._out
        index = 0  # the span the next segment starts in, and how far into it
        skip = 0
        data_sn = 0
        offset = 0
        while offset < total:
            n = min(segment, total - offset, burst - offset % burst)
            last = offset + n >= total
            flags = FINAL_BIT if last or (offset + n) % burst == 0 else 0
            if last:
                flags |= STATUS_BIT | residual_flags
            header = pack_bhs(
                Opcode.SCSI_DATA_IN,
                flags,
                Status.GOOD,
                n,
                task.lun,
                task.itt,
                NO_TAG,
                self.stat_sn if last else 0,
                session.exp_cmd_sn,
                session.advertised_max(),
                data_sn,
                offset,
                residual if last else 0,
            )
            out.append(header)
            if header_digest:
                out.append(digest_bytes(header))
            need = n
            while need:
                span = spans[index]
                left = span.length - skip
                if left <= need:
                    out.append(span if not skip else span.part(skip, left))
                    index += 1
                    skip = 0
                    need -= left
                else:
                    out.append(span.part(skip, need))
                    skip += need
                    need = 0
            pad = -n & 3
            if pad:
                out.append(_PADDING[pad])
            data_sn += 1
            offset += n
        task.responses_sent += data_sn
        self.stat_sn = (self.stat_sn + 1) & 0xFFFFFFFF

    def abort(self, itt: int) -> ScsiCommand | None:
        """Mark a task aborted: no response will be sent for it; its data is dropped."""
        task = self.tasks.pop(itt, None)
        if task is not None:
            task.aborted = True
            if task in self._r2t_waiting:
                self._r2t_waiting.remove(task)
            self._release_budget(task)
        self.session.forget(self, itt)
        return task

    def _release_budget(self, task: ScsiCommand) -> None:
        if not task.budgeted:
            return
        task.budgeted = False
        self._budget_used -= task.expected_length
        while self._r2t_waiting and self.phase is Phase.FULL_FEATURE:
            waiting = self._r2t_waiting[0]
            if self._budget_used and self._budget_used + waiting.expected_length > MAX_SOLICITED_BYTES:
                break
            self._r2t_waiting.pop(0)
            self._advance_write(waiting)

    def task_management_done(self, request: TaskManagement, response: TaskResponse) -> None:
        if self.phase is not Phase.FULL_FEATURE:
            return
        self._send_answer(Opcode.TASK_MGMT_RESPONSE, int(response), request.itt)

    def ping(self) -> None:
        """Ask the initiator whether it is still there: a NOP-In with a Target Transfer Tag
        and the ITT 0xffffffff, which it "MUST" answer with a NOP-Out carrying that tag
        (RFC 7143 11.19).  StatSN is not advanced: this is not a response."""
        if self.phase is not Phase.FULL_FEATURE or self.ping_ttt is not None:
            return
        self.ping_ttt = self._new_ttt()
        bhs = build_bhs(
            Opcode.NOP_IN,
            FINAL_BIT,
            itt=NO_TAG,
            fields=(self.ping_ttt, self.stat_sn, self.exp_cmd_sn, self._advertised_max(), 0, 0, 0),
        )
        self._send(bhs)

    def scsi_event(self, sense: bytes) -> None:
        """An Asynchronous Message carrying a SCSI asynchronous event (AsyncEvent 0, RFC 7143
        11.9.1: "a SCSI asynchronous event is reported in the sense data"): the data segment
        is SenseLength and the sense data, as in a SCSI Response."""
        if self.phase is not Phase.FULL_FEATURE:
            return
        bhs = build_bhs(
            Opcode.ASYNC_MESSAGE,
            FINAL_BIT,
            itt=NO_TAG,
            fields=(0, self.stat_sn, self.exp_cmd_sn, self._advertised_max(), 0, 0, 0),
        )
        self.stat_sn = sn_add(self.stat_sn, 1)
        self._send(bhs, len(sense).to_bytes(2, "big") + sense)

    def logout_target(self, request: LogoutRequested) -> tuple[LogoutResponse, list[TargetConnection]]:
        """What a Logout Request ends (RFC 7143 11.14.1): the answer, and the connections
        it closes once their tasks finished (reason 0: every connection of the session;
        reason 1: the one named by CID, maybe not this one; reason 2 needs ERL 2)."""
        session = self.session
        if request.reason == LogoutReason.CLOSE_SESSION:
            members = [c for c in session.connections.values() if c is not self]
            return LogoutResponse.OK, [self, *members]
        if request.reason == LogoutReason.CLOSE_CONNECTION:
            named = self if request.cid == self.cid else session.connections.get(request.cid)
            if named is None:
                return LogoutResponse.CID_NOT_FOUND, []
            return LogoutResponse.OK, [named]
        return LogoutResponse.RECOVERY_NOT_SUPPORTED, []

    def logout_done(self, request: LogoutRequested, response: LogoutResponse = LogoutResponse.OK) -> None:
        """Answer a Logout once the tasks it waited for finished; close what it ends."""
        if self.phase is not Phase.FULL_FEATURE:
            return
        self._send_answer(Opcode.LOGOUT_RESPONSE, int(response), request.itt)
        if response is not LogoutResponse.OK:
            return
        _, ending = self.logout_target(request)
        for connection in ending:
            if connection is not self:
                connection.end(f"logged out by connection {self.cid}", clean=True)
                self.session.touch(connection)
        if self in ending:
            self._close("logout", clean=True)

    def describe(self) -> dict[str, Any]:
        return {
            "initiator": self.initiator_name,
            "target": self.target_name,
            "session_type": self.session_type.value,
            "isid": f"{self.isid:012x}",
            "tsih": self.tsih,
        }
