"""Drill 4: hostile NBD clients (issue 6).

Two halves.

Live server.  The real daemon (``thinblock serve`` as a subprocess, small PDs, loopback, port 0)
gets every kind of malformed or malicious input the issue lists, over raw sockets: bad request
magic, unknown commands, READs of length 0 and of 4 GiB, a WRITE cut short by a disconnect,
offsets past the end and overflowing 64 bits (a refused WRITE's payload is made of valid-looking
request headers aimed at another client's data, so a server that lost step would do damage),
export names whose length field lies, of 0xFFFFFFFF, over 4,096 bytes or with NUL bytes,
unknown client flags, command flags that are unknown or not allowed, BLOCK_STATUS without a
context, options after NBD_OPT_GO, an option of 1 GiB, clients that stall half-way through a
message or vanish with requests in flight, and 1,000 connections opened and dropped.  For each:
the reply or the close the specification (doc/proto.md) prescribes; the daemon still running
with no error in its log; a well-behaved witness connection (opened before, kept throughout)
still served, its data intact (re-read after every case, and by qemu-io at the end); the
server's memory and open files bounded.

Sans-IO core.  A hypothesis fuzzer mutates valid sessions (bit flips, truncations, insertions,
boundary values in length and offset fields), appends random bytes to valid handshakes, and
sends options with random data; each stream is fed whole and in random pieces through both
input APIs.  Invariants: nothing raises, only documented events come out, the core's catch-all
for its own bugs is never reached, every byte it sends is a well-formed message for the event
it came with, every request handed to the application is one the specification lets it serve,
the result does not depend on how the bytes were cut, and what the core holds stays below one
message.  (Golden sequences and the named malformed inputs are in tests/protocol/; this does
not repeat them.)

The long variants (``-m long``): 20,000 examples per fuzz property; 20 rounds of every hostile
case with 10,000 connections, memory checked after every round.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import random
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.certs import Pki, make_pki
from tests.support.daemon import Daemon, running_daemon, start_daemon, toml_text
from thinblock.nbd.protocol import DEFAULT_MAX_DISCARD

from .hostile_helpers import (
    BASE_ALLOCATION,
    CMD_BLOCK_STATUS,
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    EINVAL,
    ENOSPC,
    ENOTSUP,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    INFO_BLOCK_SIZE,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_SET_META_CONTEXT,
    OPT_STARTTLS,
    OPT_STRUCTURED_REPLY,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_TOO_BIG,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_SERVER,
    REPLY_TYPE_ERROR,
    STATE_HOLE,
    U32_MAX,
    U64_MAX,
    GiB,
    KiB,
    MiB,
    PeerClosed,
    RawClient,
    Reply,
    Step,
    Witness,
    check_transcript,
    chunkings,
    feed_modes,
    info_payload,
    meta_payload,
    mutated_sessions,
    negotiated_then_random,
    option,
    options_with_random_data,
    parse_option_replies,
    pattern,
    qemu_io_verify,
    request,
    run_core,
    summarize,
    valid_sessions,
    wait_until,
)

EXPORT = "vol0"
VOLUME_SIZE = 8 * GiB  # larger than 4 GiB, so that a 4 GiB READ is refused for its length alone
HOSTILE_AREA = 1 * GiB  # where hostile clients may write; the witness owns [0, 4 MiB)
# What the server's memory may grow by (RSS, with generous margins for the allocator, which keeps
# freed memory): a server that buffered a 1 GiB option, a 4 GiB READ or a pile of replies, or
# that kept closed connections, is far past these.
# - 1,000 connections, 16 at a time: a connection costs its receive buffer while open (32 KiB
#   while negotiating, 256 KiB once in transmission).
CHURN_RSS_BOUND = 64 * MiB
# - the hostile set twice, which holds 300 connections open at once (256 are accepted: at most
#   64 MiB of receive buffers, if all of them reached transmission).
HOSTILE_SET_RSS_BOUND = 128 * MiB
# - rounds after the first (the long variant): nothing may accumulate.
ROUND_RSS_BOUND = 64 * MiB
# A client that reads no replies may hold what one connection may have in flight (128 MiB of
# requests, 8 MiB of write buffer, one 32 MiB reply) -- not the 9.4 GiB it asked for.
SLOW_READER_BOUND = 256 * MiB
FD_SLACK = 2  # a socket or two still closing when the count is read

DAEMON_TABLES: dict[str, dict[str, object]] = {
    "nbd": {"default_export": EXPORT},
    "engine": {"chunklet_size": "1MiB", "max_dirty_bytes": "32MiB"},
    "first_start": {
        "pds": 2,
        "pd_size": "512MiB",
        "raid": 1,
        "region_size": "1MiB",
        "growth_increment": "8MiB",
        "volume": EXPORT,
        "volume_size": VOLUME_SIZE,
    },
}
DAEMON_CONFIG = toml_text(DAEMON_TABLES)


# --- the live server -------------------------------------------------------------------------------


@dataclass
class Ctx:
    daemon: Daemon
    witness: Witness

    @property
    def port(self) -> int:
        return self.daemon.nbd_port

    def raw(self) -> RawClient:
        return RawClient(self.port)

    def client(self, structured: bool = False, meta: bool = False) -> RawClient:
        return RawClient(self.port).negotiate(EXPORT, structured=structured, meta=meta)

    def protocol_log_lines(self) -> int:
        return sum(1 for r in self.daemon.log_records() if r.get("event") in ("nbd-protocol", "nbd-close"))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctx]:
    daemon = start_daemon(tmp_path_factory.mktemp("hostile"), config=DAEMON_CONFIG, log_format="json")
    try:
        witness = Witness(daemon.nbd_port, EXPORT)
        witness.check()
        yield Ctx(daemon, witness)
        witness.client.disconnect()
    finally:
        assert daemon.stop() == 0, f"the daemon did not stop cleanly:\n{daemon.log_tail()}"


def poison(length: int) -> bytes:
    """A payload made of valid WRITE requests aimed at the witness's data: a server that took a
    refused WRITE's payload for requests would overwrite the witness and be caught."""
    one = request(CMD_WRITE, 0xBAD, 0, 36) + b"\xee" * 36
    return (one * (length // len(one) + 1))[:length]


def expect_error(client: RawClient, handle: int, error: int) -> Reply:
    reply = client.read_reply()
    assert reply.handle == handle, f"reply for {reply.handle}, expected {handle}"
    assert reply.error == error, f"error {reply.error}, expected {error} ({reply.message})"
    assert not reply.data, "an error reply carried data"
    if client.structured:
        # "the server SHOULD prefer sending errors via a structured reply" (and MUST for READ)
        assert REPLY_TYPE_ERROR in reply.chunk_types and reply.message, reply
    return reply


def assert_in_step(ctx: Ctx, client: RawClient) -> None:
    """A valid request after the hostile one gets its correct reply: the stream is in step."""
    reply = client.read(0, Witness.CHUNK)
    assert reply.error == 0, f"a valid READ failed after a refused request: {reply.error} {reply.message}"
    assert reply.data == ctx.witness.expected()[: Witness.CHUNK], "a valid READ returned wrong data"


def assert_closed_silently(client: RawClient) -> None:
    sent = client.expect_closed()
    assert sent == b"", f"the server sent {sent[:64].hex()} before closing"


# Each case does one hostile thing on connections of its own and asserts the prescribed answer;
# the test around it then checks the daemon and the witness.
Case = Callable[[Ctx, bool], None]
TRANSMISSION_CASES: dict[str, Case] = {}
HANDSHAKE_CASES: dict[str, Callable[[Ctx], None]] = {}


def transmission_case(fn: Case) -> Case:
    TRANSMISSION_CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


def handshake_case(fn: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    HANDSHAKE_CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


# --- transmission phase (each with simple and with structured replies) ---


@transmission_case
def case_bad_request_magic(ctx: Ctx, structured: bool) -> None:
    # Without a valid magic the stream cannot be resynchronised: "Either side MAY initiate a
    # hard disconnect if it detects a violation by the other party of a mandatory condition".
    lines = ctx.protocol_log_lines()
    with ctx.client(structured) as c:
        c.send(request(CMD_READ, 1, 0, 4096, magic=0x12560953))  # the historic magic
        assert_closed_silently(c)
    assert ctx.protocol_log_lines() > lines, "no log line says why the client was dropped"


@transmission_case
def case_garbage_instead_of_requests(ctx: Ctx, structured: bool) -> None:
    with ctx.client(structured) as c:
        c.send(random.Random(7).randbytes(4096))
        assert_closed_silently(c)


@transmission_case
def case_option_after_go(ctx: Ctx, structured: bool) -> None:
    with ctx.client(structured) as c:
        c.send(option(OPT_GO, info_payload("a-longer-name-than-a-request-header")))
        assert_closed_silently(c)


@transmission_case
def case_bare_option_header_after_go(ctx: Ctx, structured: bool) -> None:
    # 16 bytes, shorter than a request header: the server must not wait for 12 more.
    with ctx.client(structured) as c:
        c.send(option(OPT_LIST))
        assert_closed_silently(c)


@transmission_case
def case_unknown_command(ctx: Ctx, structured: bool) -> None:
    # "The server SHOULD return NBD_EINVAL if it receives an unknown command."
    with ctx.client(structured) as c:
        for command in (8, 0x3F, 0xFFFF):
            expect_error(c, c.request(command, 0, 4096), EINVAL)
        assert_in_step(ctx, c)


@transmission_case
def case_read_of_length_zero(ctx: Ctx, structured: bool) -> None:
    # "The client SHOULD NOT request a read length of 0; the behavior of a server on such a
    # request is unspecified although the server SHOULD NOT disconnect."
    with ctx.client(structured) as c:
        handle = c.request(CMD_READ, 4096, 0)
        reply = c.read_reply()
        assert reply.handle == handle and not reply.data
        assert_in_step(ctx, c)


@transmission_case
def case_read_of_4_gib(ctx: Ctx, structured: bool) -> None:
    # Larger than the maximum block size: "The server SHOULD report an NBD_EINVAL error".
    with ctx.client(structured) as c:
        expect_error(c, c.request(CMD_READ, 0, U32_MAX), EINVAL)
        expect_error(c, c.request(CMD_CACHE, 0, U32_MAX), EINVAL)
        assert_in_step(ctx, c)


@transmission_case
def case_reads_past_the_end(ctx: Ctx, structured: bool) -> None:
    with ctx.client(structured) as c:
        size = c.size
        for offset, length in ((size, 4096), (size - 512, 1024), (U64_MAX - 4095, 8192), (U64_MAX, 1)):
            expect_error(c, c.request(CMD_READ, offset, length), EINVAL)
            expect_error(c, c.request(CMD_TRIM, offset, length), EINVAL)
            expect_error(c, c.request(CMD_CACHE, offset, length), EINVAL)
        assert_in_step(ctx, c)


@transmission_case
def case_writes_past_the_end_are_consumed(ctx: Ctx, structured: bool) -> None:
    # "The server SHOULD return NBD_ENOSPC if it receives a write request including one or more
    # sectors beyond the size of the device"; the payload is still read, so the stream stays in
    # step (the poison payload would overwrite the witness otherwise).
    with ctx.client(structured) as c:
        size = c.size
        for offset, length in ((size, 4096), (size - 2048, 4096), (U64_MAX - 2047, 4096), (U64_MAX, 4096)):
            expect_error(c, c.request(CMD_WRITE, offset, length, data=poison(length)), ENOSPC)
            expect_error(c, c.request(CMD_WRITE_ZEROES, offset, length), ENOSPC)
            assert_in_step(ctx, c)


@transmission_case
def case_write_longer_than_the_maximum_block_is_consumed(ctx: Ctx, structured: bool) -> None:
    with ctx.client(structured) as c:
        assert c.block_size is not None
        length = c.block_size[2] + 4096
        assert length <= DEFAULT_MAX_DISCARD  # refused and skipped, not a reason to disconnect
        expect_error(c, c.request(CMD_WRITE, HOSTILE_AREA, length, data=poison(length)), EINVAL)
        assert_in_step(ctx, c)


@transmission_case
def case_write_of_4_gib_is_dropped(ctx: Ctx, structured: bool) -> None:
    # A payload "large enough to be deemed a denial of service attack": a hard disconnect.
    with ctx.client(structured) as c:
        c.request(CMD_WRITE, HOSTILE_AREA, U32_MAX, data=poison(64 * KiB))
        sent = c.expect_closed()
        assert sent == b"", "nothing is owed to a request whose payload is never read"


@transmission_case
def case_write_cut_short_by_a_disconnect(ctx: Ctx, structured: bool) -> None:
    # The length field promises 1 MiB, 1,000 bytes come, then the client is gone: nothing of
    # it may reach the volume.
    offset = HOSTILE_AREA + 64 * MiB + (16 * MiB if structured else 0)
    lines = ctx.protocol_log_lines()
    with ctx.client(structured) as c:
        c.request(CMD_WRITE, offset, 1 * MiB, data=pattern(1, 1000))
    assert wait_until(lambda: ctx.protocol_log_lines() > lines), "the server did not notice"
    with ctx.client() as c:
        reply = c.read(offset, 1 * MiB)
        assert reply.error == 0 and reply.data == bytes(1 * MiB), "a partial WRITE reached the volume"


@transmission_case
def case_unknown_command_flags(ctx: Ctx, structured: bool) -> None:
    # "The server SHOULD return NBD_EINVAL if it receives an unknown command flag."
    with ctx.client(structured) as c:
        for bit in (6, 9, 15):
            expect_error(c, c.request(CMD_READ, 0, 4096, flags=1 << bit), EINVAL)
            expect_error(
                c, c.request(CMD_WRITE, HOSTILE_AREA, 4096, flags=1 << bit, data=poison(4096)), EINVAL
            )
        assert_in_step(ctx, c)


@transmission_case
def case_flags_not_allowed_for_the_command(ctx: Ctx, structured: bool) -> None:
    # "It also SHOULD return NBD_EINVAL if it receives a request with a flag not explicitly
    # documented as applicable to the given request."  Sent all at once: replies come in any order.
    with ctx.client(structured) as c:
        handles = [
            c.request(CMD_READ, 0, 4096, flags=CMD_FLAG_NO_HOLE),
            c.request(CMD_READ, 0, 4096, flags=CMD_FLAG_DF),  # NBD_FLAG_SEND_DF is not advertised
            c.request(CMD_WRITE, HOSTILE_AREA, 4096, flags=CMD_FLAG_REQ_ONE, data=poison(4096)),
            c.request(CMD_WRITE, HOSTILE_AREA, 4096, flags=CMD_FLAG_FAST_ZERO, data=poison(4096)),
            c.request(CMD_TRIM, HOSTILE_AREA, 4096, flags=CMD_FLAG_NO_HOLE),
            c.request(CMD_WRITE_ZEROES, HOSTILE_AREA, 4096, flags=CMD_FLAG_DF),
            c.request(CMD_FLUSH, flags=CMD_FLAG_REQ_ONE),
            c.request(CMD_CACHE, 0, 4096, flags=CMD_FLAG_FAST_ZERO),
        ]
        replies = {}
        for _ in handles:
            reply = c.read_reply()
            replies[reply.handle] = reply
        assert sorted(replies) == sorted(handles)
        assert all(r.error == EINVAL for r in replies.values()), {h: r.error for h, r in replies.items()}
        assert_in_step(ctx, c)


@transmission_case
def case_flush_with_offset_and_length(ctx: Ctx, structured: bool) -> None:
    # "For a flush request, length and offset are reserved, and MUST be set to all-zero."
    with ctx.client(structured) as c:
        expect_error(c, c.request(CMD_FLUSH, 4096, 4096), EINVAL)
        assert_in_step(ctx, c)


@transmission_case
def case_block_status_without_a_context(ctx: Ctx, structured: bool) -> None:
    # "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS without
    # selecting at least one metadata context."
    with ctx.client(structured) as c:
        expect_error(c, c.request(CMD_BLOCK_STATUS, 0, 4096), EINVAL)
        expect_error(c, c.request(CMD_BLOCK_STATUS, 0, 4096, flags=CMD_FLAG_REQ_ONE), EINVAL)
        assert_in_step(ctx, c)


@transmission_case
def case_half_a_header_then_a_stall(ctx: Ctx, structured: bool) -> None:
    # While this client sits on half a request the server serves everyone else; when the rest
    # comes, the request is answered as if nothing had happened.
    with ctx.client(structured) as c:
        handle = c.next_handle()
        c.track(handle, CMD_READ, 0, Witness.CHUNK)
        header = request(CMD_READ, handle, 0, Witness.CHUNK)
        c.send(header[:13])
        ctx.witness.check()
        assert c.is_open_after(0.3), "the server answered or closed on half a header"
        c.send(header[13:])
        reply = c.read_reply()
        assert reply.handle == handle and reply.error == 0
        assert reply.data == ctx.witness.expected()[: Witness.CHUNK]


@transmission_case
def case_half_a_payload_then_a_stall(ctx: Ctx, structured: bool) -> None:
    offset = HOSTILE_AREA + (8 * MiB if structured else 0)
    data = pattern(5, 256 * KiB)
    with ctx.client(structured) as c:
        handle = c.request(CMD_WRITE, offset, len(data), data=data[:100_000])
        ctx.witness.check()
        assert c.is_open_after(0.3), "the server answered or closed on half a payload"
        c.send(data[100_000:])
        reply = c.read_reply()
        assert reply.handle == handle and reply.error == 0
        assert c.read(offset, len(data)).data == data


@transmission_case
def case_vanish_with_requests_in_flight(ctx: Ctx, structured: bool) -> None:
    # 32 WRITEs and 32 READs sent at once, then a TCP RST: the server must cope with replies
    # that have nowhere to go.
    with ctx.client(structured) as c:
        data = pattern(9, 64 * KiB)
        for i in range(32):
            c.request(
                CMD_WRITE, HOSTILE_AREA + 32 * MiB + i * len(data), len(data), data=data, flags=CMD_FLAG_FUA
            )
            c.request(CMD_READ, HOSTILE_AREA + i * len(data), len(data))
        c.reset()


@transmission_case
def case_disconnect_then_garbage(ctx: Ctx, structured: bool) -> None:
    # "There is no reply to an NBD_CMD_DISC"; "A client MUST NOT send anything to the server
    # after sending an NBD_CMD_DISC" -- whatever follows is ignored and the server closes.
    with ctx.client(structured) as c:
        c.send(request(CMD_DISC, 1) + request(CMD_READ, 2, 0, 4096) + b"\xff" * 1000)
        assert_closed_silently(c)


@transmission_case
def case_disconnect_with_requests_in_flight(ctx: Ctx, structured: bool) -> None:
    # NBD_CMD_DISC: "The server MUST handle all outstanding requests" before it closes.
    offset = HOSTILE_AREA + 256 * MiB + (16 * MiB if structured else 0)
    data = pattern(11, 64 * KiB)
    with ctx.client(structured) as c:
        handles = [
            c.request(CMD_WRITE, offset + i * len(data), len(data), data=data, flags=CMD_FLAG_FUA)
            for i in range(16)
        ]
        c.send(request(CMD_DISC, 0))
        replies = [c.read_reply() for _ in handles]
        assert sorted(r.handle for r in replies) == sorted(handles)
        assert all(r.error == 0 for r in replies)
        assert c.expect_closed() == b""
    with ctx.client() as c:
        assert c.read(offset, 16 * len(data)).data == data * 16


@transmission_case
def case_trim_and_zero_of_4_gib(ctx: Ctx, structured: bool) -> None:
    # TRIM and WRITE_ZEROES carry no payload: "a server SHOULD merely fail the command with an
    # NBD_EINVAL error for a client that exceeds the maximum block size, rather than initiating
    # a hard disconnect" -- this server accepts them whole (in steps): both answers are allowed.
    with ctx.client(structured) as c:
        length = U32_MAX - U32_MAX % 4096
        for command, flags in ((CMD_TRIM, 0), (CMD_WRITE_ZEROES, 0), (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO)):
            reply = c.call(command, HOSTILE_AREA, length, flags=flags)
            assert reply.error in (0, EINVAL) or (flags and reply.error == ENOTSUP), reply
        assert_in_step(ctx, c)


@transmission_case
def case_block_status_of_4_gib(ctx: Ctx, structured: bool) -> None:
    if not structured:  # no context can be negotiated without structured replies
        with ctx.client() as c:
            expect_error(c, c.request(CMD_BLOCK_STATUS, 0, U32_MAX), EINVAL)
            assert_in_step(ctx, c)
        return
    with ctx.client(structured=True, meta=True) as c:
        reply = c.call(CMD_BLOCK_STATUS, 0, U32_MAX)
        assert reply.error == 0 and reply.extents
        # "the sum of the *length* fields of the first N-1 extents (if any) MUST be less than the
        # requested length"; the witness's data comes first, allocated.
        assert sum(length for length, _ in reply.extents[:-1]) < U32_MAX
        assert reply.extents[0][1] & STATE_HOLE == 0
        one = c.call(CMD_BLOCK_STATUS, 0, U32_MAX, flags=CMD_FLAG_REQ_ONE)
        assert one.error == 0 and len(one.extents) == 1 and one.extents[0][0] <= U32_MAX
        assert_in_step(ctx, c)


# --- handshake phase ---


@handshake_case
def case_three_hundred_stalled_handshakes(ctx: Ctx) -> None:
    # More clients than the server takes, each stalled after the greeting: connections already
    # in transmission (the witness) do not notice, and once they go, newcomers are served.
    stalled = []
    try:
        for _ in range(300):
            c = RawClient(ctx.port)
            stalled.append(c)
            with contextlib.suppress(PeerClosed):
                c.greeting()
        ctx.witness.check()
    finally:
        for c in stalled:
            c.reset()
    assert wait_until(lambda: _newcomer_served(ctx)), "new clients are refused after the stalled ones left"


def _newcomer_served(ctx: Ctx) -> bool:
    try:
        with ctx.client() as c:
            return c.read(0, 4096).error == 0
    except (PeerClosed, OSError):
        return False


def _go_works(c: RawClient) -> None:
    """After a refused option, negotiation goes on: NBD_OPT_GO succeeds and a READ works."""
    replies = c.go(EXPORT)
    assert replies[-1].type == REP_ACK, replies[-1]
    reply = c.read(0, 4096)
    assert reply.error == 0 and reply.data is not None and len(reply.data) == 4096


def _refused(replies: list, allowed: tuple[int, ...]) -> None:
    # An export that does not exist or cannot: "the server SHOULD NOT send NBD_REP_INFO replies".
    assert len(replies) == 1 and replies[0].type in allowed, [(hex(r.type), r.payload[:80]) for r in replies]


@handshake_case
def case_unknown_client_flags(ctx: Ctx) -> None:
    # "the server MUST drop the TCP connection if the client sets an unknown flag"
    for flags in (FLAG_C_FIXED_NEWSTYLE | 1 << 2, FLAG_C_FIXED_NEWSTYLE | 1 << 31, U32_MAX):
        lines = ctx.protocol_log_lines()
        with ctx.raw() as c:
            c.handshake(client_flags=flags)
            c.try_send(option(OPT_LIST))  # an option it must not answer
            assert_closed_silently(c)
        assert ctx.protocol_log_lines() > lines


@handshake_case
def case_go_name_length_past_the_option(ctx: Ctx) -> None:
    # "32 bits, length of name (unsigned); MUST be no larger than the option data length - 6"
    with ctx.raw() as c:
        c.handshake()
        for opt in (OPT_INFO, OPT_GO):
            c.send_option(opt, info_payload(EXPORT, name_length=len(EXPORT) + 1))
            _refused(c.option_replies(opt), (REP_ERR_INVALID,))
            c.send_option(opt, info_payload(EXPORT, (INFO_BLOCK_SIZE,), name_length=len(EXPORT) + 100))
            _refused(c.option_replies(opt), (REP_ERR_INVALID,))
        _go_works(c)


@handshake_case
def case_go_name_length_ffffffff(ctx: Ctx) -> None:
    with ctx.raw() as c:
        c.handshake()
        for opt in (OPT_INFO, OPT_GO):
            c.send_option(opt, info_payload(EXPORT, name_length=U32_MAX))
            _refused(c.option_replies(opt), (REP_ERR_INVALID,))
        _go_works(c)


@handshake_case
def case_go_names_over_4096_bytes_or_with_nul(ctx: Ctx) -> None:
    # Strings "MUST NOT contain NUL characters ... MUST be no longer than 4096 bytes".
    with ctx.raw() as c:
        c.handshake()
        for name in (
            b"v" * 4097,
            b"v" * 20000,
            EXPORT.encode() + b"\0",
            b"\0" + EXPORT.encode(),
            b"\xff\xfe",
        ):
            for opt in (OPT_INFO, OPT_GO):
                c.send_option(opt, info_payload(name))
                _refused(c.option_replies(opt), (REP_ERR_INVALID, REP_ERR_UNKNOWN))
        _go_works(c)


@handshake_case
def case_meta_context_name_length_past_the_option(ctx: Ctx) -> None:
    with ctx.raw() as c:
        c.handshake()
        c.send_option(OPT_STRUCTURED_REPLY)
        assert c.option_replies(OPT_STRUCTURED_REPLY)[-1].type == REP_ACK
        c.structured = True
        for name_length in (len(EXPORT) + 1, 1000, U32_MAX):
            c.send_option(
                OPT_SET_META_CONTEXT, meta_payload(EXPORT, (BASE_ALLOCATION,), name_length=name_length)
            )
            _refused(c.option_replies(OPT_SET_META_CONTEXT), (REP_ERR_INVALID,))
        c.send_option(OPT_SET_META_CONTEXT, meta_payload(EXPORT + "\0", (BASE_ALLOCATION,)))
        _refused(c.option_replies(OPT_SET_META_CONTEXT), (REP_ERR_INVALID, REP_ERR_UNKNOWN))
        _go_works(c)
        # The failed SET_META_CONTEXT selected nothing ("Issuing this command replaces all
        # previously-set metadata contexts (including when this command fails)").
        expect_error(c, c.request(CMD_BLOCK_STATUS, 0, 4096), EINVAL)


@handshake_case
def case_export_name_that_cannot_be_served(ctx: Ctx) -> None:
    # NBD_OPT_EXPORT_NAME cannot be answered with an error: "If the chosen export does not exist
    # or requirements for the chosen export are not met ... the server MUST terminate the session."
    for name in (EXPORT.encode() + b"\0", b"\0", b"v" * 4097, b"v" * 60000, b"no-such-volume", b"\xc3\x28"):
        with ctx.raw() as c:
            c.handshake()
            c.send_option(OPT_EXPORT_NAME, name)
            assert_closed_silently(c)  # in particular, no size and flags of any export


@handshake_case
def case_option_of_1_gib(ctx: Ctx) -> None:
    # Header says 1 GiB (and then 0xFFFFFFFF): the server must neither wait for nor buffer it;
    # "if a server believes a client's behaviour constitutes a denial of service, it MAY initiate
    # a hard disconnect" (an error reply first is a courtesy).
    for length in (1 * GiB, U32_MAX):
        for opt in (OPT_INFO, OPT_GO, OPT_LIST, 0x7777):
            sent = _send_huge_option(ctx, opt, length)
            if sent:
                replies = parse_option_replies(sent)
                assert [r.type for r in replies] == [REP_ERR_TOO_BIG] and replies[0].option == opt


@handshake_case
def case_export_name_of_1_gib(ctx: Ctx) -> None:
    # NBD_OPT_EXPORT_NAME has no reply packets ("The server will reply to any option apart from
    # NBD_OPT_EXPORT_NAME with reply packets"; a client reads the export's size and flags next):
    # refused, it can only be "terminate the session" -- a close with nothing sent.
    for length in (1 * GiB, U32_MAX):
        assert _send_huge_option(ctx, OPT_EXPORT_NAME, length) == b"", (
            "an option reply to NBD_OPT_EXPORT_NAME"
        )


def _send_huge_option(ctx: Ctx, opt: int, length: int) -> bytes:
    """An option header announcing ``length`` bytes, then 8 MiB of them (or as much as the
    server takes before it hangs up); what the server sent before it closed."""
    with ctx.raw() as c:
        c.handshake()
        c.send(option(opt, length=length))
        chunk = b"\x00" * (1 * MiB)
        for _ in range(8):
            if not c.try_send(chunk):
                break
        return c.expect_closed()


@handshake_case
def case_unknown_options_are_refused_and_negotiation_goes_on(ctx: Ctx) -> None:
    # "Servers that receive messages which they do not implement MUST reply to them with
    # NBD_REP_ERR_UNSUP"
    with ctx.raw() as c:
        c.handshake()
        for opt in (0, 4, 11, 0x7777, U32_MAX):
            c.send_option(opt, b"x" * 100)
            _refused(c.option_replies(opt), (REP_ERR_UNSUP,))
        _go_works(c)


@handshake_case
def case_half_an_option_header_then_a_stall(ctx: Ctx) -> None:
    with ctx.raw() as c:
        c.handshake()
        header = option(OPT_LIST)
        c.send(header[:7])
        ctx.witness.check()
        assert c.is_open_after(0.3)
        c.send(header[7:])
        replies = c.option_replies(OPT_LIST)
        assert replies[-1].type == REP_ACK
        names = [
            r.payload[4 : 4 + struct.unpack(">I", r.payload[:4])[0]] for r in replies if r.type == REP_SERVER
        ]
        assert EXPORT.encode() in names
        _go_works(c)


@handshake_case
def case_half_an_option_payload_then_a_stall(ctx: Ctx) -> None:
    with ctx.raw() as c:
        c.handshake()
        message = option(OPT_INFO, info_payload(EXPORT, (INFO_BLOCK_SIZE,)))
        c.send(message[:19])
        ctx.witness.check()
        assert c.is_open_after(0.3)
        c.send(message[19:])
        replies = c.option_replies(OPT_INFO)
        assert replies[-1].type == REP_ACK and REP_INFO in [r.type for r in replies]
        _go_works(c)


@handshake_case
def case_abort_with_data(ctx: Ctx) -> None:
    # "The server MUST reply with NBD_REP_ACK" and "SHOULD ignore any data sent".
    with ctx.raw() as c:
        c.handshake()
        c.send_option(OPT_ABORT, b"\xff" * 100)
        assert [r.type for r in c.option_replies(OPT_ABORT)] == [REP_ACK]
        assert c.expect_closed() == b""


@handshake_case
def case_thousands_of_options_without_waiting(ctx: Ctx) -> None:
    # "The client MUST NOT send any option until it has received a final reply to any option it
    # has sent"; 10,000 of them in a row is a denial of service the server may end.
    with ctx.raw() as c:
        c.handshake()
        c.try_send(option(OPT_STRUCTURED_REPLY) * 10_000)
        received = c.expect_closed()
        replies = parse_option_replies(received[: len(received) - len(received) % 20])
        assert all(r.type == REP_ACK for r in replies) and len(replies) < 10_000


# --- the tests -------------------------------------------------------------------------------------


def _after_case(ctx: Ctx) -> None:
    assert ctx.daemon.running, f"the daemon died:\n{ctx.daemon.log_tail()}"
    bad = ctx.daemon.bad_log_records()
    assert not bad, f"errors in the daemon's log: {bad[:5]}"
    ctx.witness.check()


# Cases that fail because of a bug in the server (see the reasons); the suite says so.
KNOWN_BUGS: dict[str, str] = {}  # case name -> the bug it exposes (xfail, strict); none open


def _cases(names: list[str]) -> list[object]:
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_BUGS[n])) if n in KNOWN_BUGS else n
        for n in names
    ]


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize("name", _cases(sorted(TRANSMISSION_CASES)))
def test_hostile_request(ctx: Ctx, name: str, structured: bool) -> None:
    TRANSMISSION_CASES[name](ctx, structured)
    _after_case(ctx)


@pytest.mark.parametrize("name", _cases(sorted(HANDSHAKE_CASES)))
def test_hostile_handshake(ctx: Ctx, name: str) -> None:
    HANDSHAKE_CASES[name](ctx)
    _after_case(ctx)


def churn(ctx: Ctx, count: int, workers: int = 16) -> int:
    """Open and drop ``count`` connections, 16 at a time, in six ways: closed at once, after the
    greeting, RST in the middle of the client flags, after NBD_OPT_GO without NBD_CMD_DISC,
    RST with WRITEs in flight, and a proper NBD_CMD_DISC.  The witness is checked every 100."""

    def one(i: int) -> None:
        kind = i % 6
        c = RawClient(ctx.port)
        try:
            if kind == 0:
                return
            c.greeting()
            if kind == 1:
                return
            if kind == 2:
                c.send(b"\x00\x00")
                c.reset()
                return
            c.send(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
            replies = c.go(EXPORT)
            assert replies[-1].type == REP_ACK
            if kind == 4:
                for j in range(4):
                    c.request(
                        CMD_WRITE,
                        HOSTILE_AREA + 128 * MiB + (i % 64) * 256 * KiB + j * 4096,
                        4096,
                        data=b"\x5a" * 4096,
                    )
                c.reset()
            elif kind == 5:
                c.disconnect()
        finally:
            c.close()

    done = 0
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for start in range(0, count, 100):
            list(pool.map(one, range(start, min(count, start + 100))))
            done = min(count, start + 100)
            ctx.witness.check()
    return done


def all_cases(ctx: Ctx) -> int:
    """Every hostile case once (transmission ones in both reply modes); the cases of known bugs
    too, as hostile input, without their failing assertion."""
    for name, fn in HANDSHAKE_CASES.items():
        with contextlib.suppress(*((AssertionError,) if name in KNOWN_BUGS else ())):
            fn(ctx)
    for name, tfn in TRANSMISSION_CASES.items():
        for structured in (False, True):
            with contextlib.suppress(*((AssertionError,) if name in KNOWN_BUGS else ())):
                tfn(ctx, structured)
    return len(HANDSHAKE_CASES) + 2 * len(TRANSMISSION_CASES)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Ctx]:
    """A daemon of its own: its memory figures owe nothing to the tests before."""
    daemon = start_daemon(tmp_path / "fresh", config=DAEMON_CONFIG, log_format="json")
    try:
        witness = Witness(daemon.nbd_port, EXPORT)
        witness.check()
        yield Ctx(daemon, witness)
        witness.client.disconnect()
    finally:
        assert daemon.stop() == 0, f"the daemon did not stop cleanly:\n{daemon.log_tail()}"


def test_a_thousand_connections_opened_and_dropped(fresh: Ctx) -> None:
    fds_before = fresh.daemon.fds()
    assert churn(fresh, 1000) == 1000
    _after_case(fresh)
    opened = sum(1 for r in fresh.daemon.log_records() if r.get("event") == "nbd-open")
    assert opened >= 500, f"only {opened} of the connections reached transmission"
    fds_after = fresh.daemon.settled_fds(fds_before + FD_SLACK)
    assert fds_after <= fds_before + FD_SLACK, f"open fds {fds_before} -> {fds_after}"


def test_memory_after_a_thousand_connections(fresh: Ctx) -> None:
    rss_before = fresh.daemon.rss()
    churn(fresh, 1000)
    rss_after = fresh.daemon.rss()
    assert rss_after - rss_before < CHURN_RSS_BOUND, f"RSS {rss_before >> 20} -> {rss_after >> 20} MiB"


def test_memory_after_the_hostile_set(fresh: Ctx) -> None:
    rss_before, fds_before = fresh.daemon.rss(), fresh.daemon.fds()
    all_cases(fresh)
    all_cases(fresh)
    _after_case(fresh)
    rss_after = fresh.daemon.rss()
    fds_after = fresh.daemon.settled_fds(fds_before + FD_SLACK)
    assert rss_after - rss_before < HOSTILE_SET_RSS_BOUND, f"RSS {rss_before >> 20} -> {rss_after >> 20} MiB"
    assert fds_after <= fds_before + FD_SLACK, f"open fds {fds_before} -> {fds_after}"


def test_a_client_that_never_reads_its_replies(ctx: Ctx) -> None:
    """300 READs of 32 MiB (9.4 GiB of replies) from a client that reads nothing: the server
    stops reading from it (back-pressure) instead of buffering the replies."""
    offset = HOSTILE_AREA + 512 * MiB
    with ctx.client() as c:
        for k in range(2):
            assert c.write(offset + k * 32 * MiB, pattern(20 + k, 32 * MiB)).error == 0
    rss_before = ctx.daemon.rss()
    for structured in (False, True):
        c = ctx.client(structured)
        try:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            for i in range(300):
                c.request(CMD_READ, offset + (i % 2) * 32 * MiB, 32 * MiB)
            peak = 0
            for _ in range(20):  # the server had time to fill whatever it would buffer
                peak = max(peak, ctx.daemon.rss())
                time.sleep(0.1)
            ctx.witness.check()
            assert peak - rss_before < SLOW_READER_BOUND, f"RSS {rss_before >> 20} -> {peak >> 20} MiB"
        finally:
            c.reset()
    _after_case(ctx)


def test_witness_data_read_by_qemu_io(ctx: Ctx) -> None:
    """A client no one here wrote reads the witness's data as it wrote it."""
    ctx.witness.check()
    qemu_io_verify(ctx.daemon.uri(EXPORT), ctx.witness.qemu_io_commands())


def test_stop_with_hostile_clients_connected(tmp_path: Path) -> None:
    """SIGTERM while clients stall in the handshake, in a request header, in a WRITE payload, and
    one never reads its replies: the daemon still stops cleanly (exit 0), and after a restart the
    witness's data is all there."""
    workdir = tmp_path / "stop"
    daemon = start_daemon(workdir, config=DAEMON_CONFIG, log_format="json")
    clients: list[RawClient] = []
    try:
        witness = Witness(daemon.nbd_port, EXPORT)
        witness.check()
        witness.check()
        stalled = RawClient(daemon.nbd_port)
        stalled.greeting()
        half_payload = RawClient(daemon.nbd_port).negotiate(EXPORT)
        half_payload.request(CMD_WRITE, HOSTILE_AREA, 1 * MiB, data=b"x" * 1000)
        never_reads = RawClient(daemon.nbd_port).negotiate(EXPORT)
        never_reads.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for _ in range(50):
            never_reads.request(CMD_READ, 0, 32 * MiB)
        half_header = RawClient(daemon.nbd_port).negotiate(EXPORT, structured=True)
        half_header.send(request(CMD_READ, 1, 0, 4096)[:10])
        clients = [stalled, half_payload, never_reads, half_header, witness.client]
        witness.check()  # a round trip through the server's event loop, after the hostile bytes
    finally:
        rc = daemon.stop()
        for c in clients:
            c.close()
    assert rc == 0, f"the daemon did not stop cleanly:\n{daemon.log_tail()}"
    assert not daemon.bad_log_records(), daemon.bad_log_records()[:5]
    with (
        running_daemon(workdir, config=DAEMON_CONFIG, log_format="json") as again,
        RawClient(again.nbd_port).negotiate(EXPORT) as c,
    ):
        assert c.read(0, witness.area).data == witness.expected(), (
            "data lost over a stop with hostile clients"
        )


# --- denial of service (issue 17): connection limits, idle clients, TLS, refusal logs ---------------

ATTACKER = "127.0.0.2"  # all of 127/8 is loopback: a client address other than the witness's
PER_CLIENT_LIMIT = 100
DOS_HANDSHAKE_TIMEOUT = 5.0  # seconds; stalled TLS handshakes must be closed within it
# What 100 connections idle in transmission may cost: each holds a 256 KiB receive buffer and a
# few KiB of objects, so about 30 MiB; the margin is the allocator's.
AT_LIMIT_RSS_BOUND = 64 * MiB
# What 1,000 more connections, all refused, may add once the limit is reached: nothing is kept of
# a refused connection, so this is noise.
REFUSED_RSS_BOUND = 16 * MiB


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Ctx, Pki]]:
    """A daemon with a per-client limit of 100, TLS allowed (client certificates checked), a short
    handshake timeout, and refusal log lines at most every 10 s (the default).  Tests leave the
    attacker's address with no connection."""
    tmp_path = tmp_path_factory.mktemp("limited")
    pki = make_pki(tmp_path / "pki")
    config = toml_text(
        {
            **DAEMON_TABLES,
            "nbd": {
                **DAEMON_TABLES["nbd"],
                "max_connections": 256,
                "max_connections_per_client": PER_CLIENT_LIMIT,
                "handshake_timeout": DOS_HANDSHAKE_TIMEOUT,
                "tls": "allowed",
                "tls_cert": str(pki.server_cert),
                "tls_key": str(pki.server_key),
                "tls_ca": str(pki.ca_cert),
            },
        }
    )
    daemon = start_daemon(tmp_path / "limited", config=config, log_format="json")
    try:
        witness = Witness(daemon.nbd_port, EXPORT)
        witness.check()
        yield Ctx(daemon, witness), pki
        witness.client.disconnect()
    finally:
        assert daemon.stop() == 0, f"the daemon did not stop cleanly:\n{daemon.log_tail()}"


def _idle_in_transmission(port: int) -> RawClient | None:
    """A connection from the attacker's address that negotiates and then sends nothing; None when
    the server refused it (closed before the greeting)."""
    c = RawClient(port, timeout=10, source=ATTACKER)
    try:
        c.greeting()
        c.send(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
        assert c.go(EXPORT)[-1].type == REP_ACK
        return c
    except (PeerClosed, OSError):
        c.close()
        return None


def _refused_attempts(port: int, count: int, workers: int = 8) -> int:
    """``count`` connections from the attacker's address that the server should refuse; how many
    it did (closed without a greeting)."""

    def one(_: int) -> bool:
        c = RawClient(port, timeout=10, source=ATTACKER)
        try:
            c.greeting()
            return False
        except (PeerClosed, OSError):
            return True
        finally:
            c.close()

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, range(count)))


def _metric(daemon: Daemon, name: str) -> float:
    with daemon.http() as http:
        text = http.get("/metrics").text
    for line in text.splitlines():
        if line.split(" ")[0] == name:  # the name with its labels, as /metrics writes it
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in /metrics")


REFUSED_CLIENT_LIMIT = 'thinblock_nbd_connections_refused_total{reason="client-limit"}'


def _refusal_lines(daemon: Daemon) -> list[dict]:
    return [r for r in daemon.log_records() if r.get("event") == "nbd-refused"]


def test_a_thousand_idle_connections_with_a_limit_of_100(limited: tuple[Ctx, Pki]) -> None:
    """1,000 connections from one address, each negotiating and then idle, with a per-client limit
    of 100: exactly 100 are kept, 900 refused; the witness and newcomers from another address are
    still served; RSS at the limit is bounded and stays flat through 1,000 more refused; every
    refusal is counted in the metrics and the log has a handful of lines, not 1,900."""
    ctx, _pki = limited
    rss_before = ctx.daemon.rss()
    refused_before = _metric(ctx.daemon, REFUSED_CLIENT_LIMIT)
    lines_before = len(_refusal_lines(ctx.daemon))
    held: list[RawClient] = []
    refused = 0
    started = time.monotonic()
    try:
        for _ in range(1000):
            c = _idle_in_transmission(ctx.port)
            if c is None:
                refused += 1
            else:
                held.append(c)
        assert (len(held), refused) == (PER_CLIENT_LIMIT, 900)
        ctx.witness.check()
        assert _newcomer_served(ctx), "a client from another address was refused"
        rss_at_limit = ctx.daemon.rss()
        assert _refused_attempts(ctx.port, 1000) == 1000
        rss_after = ctx.daemon.rss()
        ctx.witness.check()
        elapsed = time.monotonic() - started
        print(
            f"\nDOS-IDLE held={len(held)} refused={refused + 1000} rss_before_mib={rss_before >> 20}"
            f" rss_at_limit_mib={rss_at_limit >> 20} rss_after_1000_refused_mib={rss_after >> 20}"
            f" seconds={elapsed:.1f}"
        )
        assert rss_at_limit - rss_before < AT_LIMIT_RSS_BOUND, (
            f"RSS {rss_before >> 20} -> {rss_at_limit >> 20} MiB at the limit"
        )
        assert rss_after - rss_at_limit < REFUSED_RSS_BOUND, (
            f"RSS {rss_at_limit >> 20} -> {rss_after >> 20} MiB over 1,000 refused connections"
        )
        assert _metric(ctx.daemon, REFUSED_CLIENT_LIMIT) - refused_before == 1900
        assert _metric(ctx.daemon, "thinblock_nbd_connections") >= PER_CLIENT_LIMIT + 1
        lines = _refusal_lines(ctx.daemon)[lines_before:]
        # At most two lines per 10 s interval (the first refusal, then a summary), whatever the rate.
        assert 1 <= len(lines) <= 2 * (int(elapsed // 10) + 2), [r.get("msg") for r in lines]
    finally:
        for c in held:
            c.reset()
    _after_case(ctx)


def test_ten_thousand_refused_connections_log_a_bounded_number_of_lines(limited: tuple[Ctx, Pki]) -> None:
    """The issue's figure: 10,000 refused connections wrote 10,001 log lines.  Now at most two per
    10 s interval (the first refusal, then a summary when the interval ends), every refusal
    counted in the metrics, and the lines adding up to the count."""
    ctx, _pki = limited
    refused_before = _metric(ctx.daemon, REFUSED_CLIENT_LIMIT)
    lines_before = len(_refusal_lines(ctx.daemon))
    held = [c for c in (_idle_in_transmission(ctx.port) for _ in range(PER_CLIENT_LIMIT)) if c is not None]
    try:
        assert len(held) == PER_CLIENT_LIMIT
        started = time.monotonic()
        assert _refused_attempts(ctx.port, 10_000) == 10_000
        elapsed = time.monotonic() - started
        ctx.witness.check()
        assert _metric(ctx.daemon, REFUSED_CLIENT_LIMIT) - refused_before == 10_000
        # Every refusal is in the log, as one line or within a summary (written when its 10 s
        # interval ends): the lines add up to what the metrics counted, since the daemon started.
        assert wait_until(
            lambda: (
                sum(int(r.get("refused", 1)) for r in _refusal_lines(ctx.daemon))
                == _metric(ctx.daemon, REFUSED_CLIENT_LIMIT)
            ),
            timeout=30,
        ), [r.get("msg") for r in _refusal_lines(ctx.daemon)]
        lines = _refusal_lines(ctx.daemon)[lines_before:]
        print(f"\nDOS-REFUSED refused=10000 log_lines={len(lines)} seconds={elapsed:.1f}")
        assert len(lines) <= 2 * (int((time.monotonic() - started) // 10) + 2), [r.get("msg") for r in lines]
    finally:
        for c in held:
            c.reset()
    _after_case(ctx)


def _starttls(port: int) -> RawClient:
    c = RawClient(port, timeout=30)
    c.handshake()
    c.send_option(OPT_STARTTLS)
    assert [r.type for r in c.option_replies(OPT_STARTTLS)] == [REP_ACK]
    return c


def _client_hello() -> bytes:
    """The first flight of a real TLS client (a ClientHello), made in memory."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=False)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _tls_client(ctx: Ctx, pki: Pki) -> RawClient:
    """A well-behaved TLS client with a client certificate, in transmission."""
    c = _starttls(ctx.port)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    c.sock = context.wrap_socket(c.sock, server_hostname="127.0.0.1")
    assert c.go(EXPORT)[-1].type == REP_ACK
    return c


def test_stalled_tls_handshakes_cost_only_their_connections(limited: tuple[Ctx, Pki]) -> None:
    """30 clients stall right after NBD_OPT_STARTTLS's ACK, 30 after half a ClientHello: a TLS
    client and the witness are served meanwhile, and the server closes every stalled one within
    its handshake timeout."""
    ctx, pki = limited
    fds_before = ctx.daemon.fds()
    hello = _client_hello()
    stalled: list[RawClient] = []
    try:
        for i in range(60):
            c = _starttls(ctx.port)
            if i % 2:
                c.send(hello[: len(hello) // 2])
            stalled.append(c)
        ctx.witness.check()
        with _tls_client(ctx, pki) as tls:
            reply = tls.read(0, Witness.CHUNK)
            assert reply.error == 0 and reply.data == ctx.witness.expected()[: Witness.CHUNK]
        for c in stalled:
            assert c.expect_closed(timeout=DOS_HANDSHAKE_TIMEOUT * 6) == b""
    finally:
        for c in stalled:
            c.close()
    assert ctx.daemon.settled_fds(fds_before + FD_SLACK) <= fds_before + FD_SLACK
    _after_case(ctx)


def _closed_by_server(sock: socket.socket | ssl.SSLSocket, timeout: float = 30.0) -> None:
    """Read until the server closes; fail if it has not after ``timeout`` seconds (a generous
    bound, not a timing)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, ssl.SSLError):
        return  # a TLS alert or a reset: closed too
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {timeout:.0f} s") from None


def test_garbage_after_starttls_costs_only_its_connection(limited: tuple[Ctx, Pki]) -> None:
    """Garbage instead of a ClientHello; a ClientHello then garbage; a finished TLS handshake then
    bytes that are not TLS records; NBD garbage inside TLS: each connection is closed at once,
    nothing else notices.  (The garbage starts with a byte that is no TLS content type, so that
    the server can tell at once; garbage that could be the start of a record is a stall, above.)"""
    ctx, pki = limited
    rng = random.Random(17)
    fds_before = ctx.daemon.fds()
    for round_ in range(6):
        junk = b"\x00" + rng.randbytes(rng.choice((4, 300, 4096)))
        c = _starttls(ctx.port)
        c.try_send(junk)
        _closed_by_server(c.sock)
        c.close()
        c = _starttls(ctx.port)
        c.try_send(_client_hello() + junk)
        _closed_by_server(c.sock)
        c.close()
        tls = _tls_client(ctx, pki)
        plain = socket.socket(fileno=tls.sock.detach())  # the TCP socket under the TLS session
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            plain.sendall(junk)
        _closed_by_server(plain)
        plain.close()
        with _tls_client(ctx, pki) as inside:
            inside.try_send(b"\xde\xad\xbe\xef" + junk + bytes(28))  # no request magic
            _closed_by_server(inside.sock)
        if round_ % 2 == 0:
            ctx.witness.check()
    assert ctx.daemon.settled_fds(fds_before + FD_SLACK) <= fds_before + FD_SLACK
    _after_case(ctx)


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_denial_of_service_rounds_long(limited: tuple[Ctx, Pki]) -> None:
    """10 rounds of: 1,000 idle connections from one address (100 kept), 10,000 refused, 60 TLS
    handshakes stalled (which once kept their slots for ever); RSS at the limit must not grow
    with the rounds beyond allocator drift."""
    ctx, _pki = limited
    hello = _client_hello()
    series: list[int] = []
    for round_ in range(10):
        held = [c for c in (_idle_in_transmission(ctx.port) for _ in range(1000)) if c is not None]
        stalled: list[RawClient] = []
        try:
            assert len(held) == PER_CLIENT_LIMIT
            assert _refused_attempts(ctx.port, 10_000) == 10_000
            for i in range(60):  # from the witness's address, which may hold 100 in all
                c = _starttls(ctx.port)
                if i % 2:
                    c.send(hello[: len(hello) // 2])
                stalled.append(c)
            ctx.witness.check()
            series.append(ctx.daemon.rss() >> 20)
            for c in stalled:
                assert c.expect_closed(timeout=DOS_HANDSHAKE_TIMEOUT * 6) == b""
        finally:
            for c in held + stalled:
                c.reset()
        _after_case(ctx)
        if round_ >= 3:  # after three rounds of the allocator's warm-up, as in the long drill above
            # A leak of what a round holds (100 connections in transmission: 25 MiB of receive
            # buffers) would pass this bound within three rounds; a few MiB of allocator drift
            # over ten rounds of 11,000 connections does not (measured: +2-3 MiB per round).
            assert (series[-1] - series[2]) << 20 < ROUND_RSS_BOUND, (
                f"RSS at the limit per round: {series} MiB"
            )
    print(f"\nDOS-LONG rounds=10 rss_at_limit_mib={series}")


@pytest.mark.long
def test_stalled_handshake_is_closed_long(ctx: Ctx) -> None:
    """A client that connects and never negotiates is closed by the server (its handshake
    timeout, 30 s by default), so stalled clients cannot hold connection slots for ever."""
    with ctx.raw() as c:
        c.greeting()
        started = time.monotonic()
        assert c.expect_closed(timeout=120) == b""
        print(f"\nstalled handshake closed by the server after {time.monotonic() - started:.0f} s")
    _after_case(ctx)


@pytest.mark.long
@pytest.mark.timeout(1800)
def test_hostile_rounds_long(tmp_path: Path) -> None:
    """20 rounds of every hostile case and 500 connections per round (10,000 in all), after three
    rounds of warm-up (the allocator keeps its peak, which the known bug above makes higher);
    RSS and open fds checked after every round: nothing may accumulate."""
    daemon = start_daemon(tmp_path / "hostile-long", config=DAEMON_CONFIG, log_format="json")
    try:
        witness = Witness(daemon.nbd_port, EXPORT)
        ctx = Ctx(daemon, witness)
        for _ in range(3):
            all_cases(ctx)
            churn(ctx, 500)
        rss0, fds0 = daemon.rss(), daemon.fds()
        started = time.monotonic()
        sessions = connections = 0
        series = []
        for round_ in range(20):
            sessions += all_cases(ctx)
            connections += churn(ctx, 500)
            _after_case(ctx)
            rss = daemon.rss()
            series.append(rss >> 20)
            assert rss - rss0 < ROUND_RSS_BOUND, f"round {round_}: RSS {rss0 >> 20} -> {series} MiB"
            assert daemon.settled_fds(fds0 + FD_SLACK) <= fds0 + FD_SLACK
        qemu_io_verify(daemon.uri(EXPORT), witness.qemu_io_commands())
        print(
            f"\nDRILL4-LONG rounds=20 hostile_sessions={sessions} connections={connections}"
            f" witness_checks={witness.checks} rss_after_warmup_mib={rss0 >> 20} rss_per_round_mib={series}"
            f" fds_start={fds0} fds_end={daemon.fds()} seconds={time.monotonic() - started:.0f} data_lost=0"
        )
        witness.client.disconnect()
    finally:
        assert daemon.stop() == 0, daemon.log_tail()


# --- the sans-IO core, fuzzed ----------------------------------------------------------------------

CI_FUZZ = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
LONG_FUZZ = settings(
    max_examples=20_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_stream(data: bytes, chunks: list[int], mode: str, eof: bool) -> list:
    """Feed ``data`` whole and cut into ``chunks`` through ``mode``: both transcripts well-formed
    and identical."""
    whole = run_core(data, [max(1, len(data))], "receive", eof)
    check_transcript(whole, data)
    cut = run_core(data, chunks, mode, eof)
    check_transcript(cut, data)
    assert [summarize(s) for s in cut] == [summarize(s) for s in whole], "the result depends on the cuts"
    assert b"".join(s.out for s in cut) == b"".join(s.out for s in whole), "the bytes depend on the cuts"
    return whole


def _valid(session: tuple[bytes, int], chunks: list[int], mode: str, eof: bool) -> list[Step]:
    data, _ = session
    steps = check_stream(data, chunks, mode, eof)
    kinds = [type(s.event).__name__ for s in steps[1:]]
    # The generator itself is right: a valid session is served without a refusal.
    assert "ProtocolError" not in kinds and "RequestRejected" not in kinds, kinds
    return steps


_fuzz_args = (chunkings, feed_modes, st.booleans())
_random_streams = st.one_of(negotiated_then_random(), options_with_random_data(), st.binary(max_size=200))


@CI_FUZZ
@given(valid_sessions(), *_fuzz_args)
def test_fuzz_valid_sessions_are_served(
    session: tuple[bytes, int], chunks: list[int], mode: str, eof: bool
) -> None:
    _valid(session, chunks, mode, eof)


@CI_FUZZ
@given(mutated_sessions(), *_fuzz_args)
def test_fuzz_mutated_sessions(mutated: tuple[bytes, int], chunks: list[int], mode: str, eof: bool) -> None:
    check_stream(mutated[0], chunks, mode, eof)


@CI_FUZZ
@given(_random_streams, *_fuzz_args)
def test_fuzz_random_bytes(data: bytes, chunks: list[int], mode: str, eof: bool) -> None:
    check_stream(data, chunks, mode, eof)


@pytest.mark.long
@pytest.mark.timeout(3600)
def test_fuzz_long() -> None:
    """The three properties with 20,000 examples each; the figures for docs/reliability.md."""
    figures: Counter[str] = Counter()

    def tally(data: bytes, steps: list[Step]) -> None:
        figures["streams"] += 1
        figures["bytes_fed"] += len(data)
        for step in steps[1:]:
            figures["event:" + type(step.event).__name__] += 1

    @LONG_FUZZ
    @given(valid_sessions(), *_fuzz_args)
    def valid(session: tuple[bytes, int], chunks: list[int], mode: str, eof: bool) -> None:
        tally(session[0], _valid(session, chunks, mode, eof))

    @LONG_FUZZ
    @given(mutated_sessions(), *_fuzz_args)
    def mutated(mutated: tuple[bytes, int], chunks: list[int], mode: str, eof: bool) -> None:
        figures["mutations"] += mutated[1]
        tally(mutated[0], check_stream(mutated[0], chunks, mode, eof))

    @LONG_FUZZ
    @given(_random_streams, *_fuzz_args)
    def random_bytes(data: bytes, chunks: list[int], mode: str, eof: bool) -> None:
        tally(data, check_stream(data, chunks, mode, eof))

    started = time.monotonic()
    valid()
    mutated()
    random_bytes()
    figures["seconds"] = round(time.monotonic() - started)
    print("\nDRILL4-FUZZ-LONG " + " ".join(f"{k}={v}" for k, v in sorted(figures.items())) + " failures=0")
