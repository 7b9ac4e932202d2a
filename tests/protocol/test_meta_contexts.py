"""qemu's ``qemu:dirty-bitmap:NAME`` metadata contexts beside ``base:allocation``: listing and
selecting them (NBD_OPT_LIST/SET_META_CONTEXT, golden bytes fed whole, byte by byte, through
get_buffer and with trailing data), and the block status reply with one chunk per context."""

from __future__ import annotations

import pytest

from thinblock.nbd.constants import Command, CommandFlags, OptionReply
from thinblock.nbd.protocol import (
    ExportChosen,
    ExportInfo,
    MetaContext,
    OptionRequest,
    ReplyError,
    Request,
    RequestRejected,
    ServerConnection,
)

from .wire import (
    ALL_FLAGS,
    FEEDERS,
    GREETING,
    drain,
    info_payload,
    meta_payload,
    option,
    option_reply,
    request,
    u16,
    u32,
    u64,
)

feeders = pytest.mark.parametrize("feed", list(FEEDERS.values()), ids=list(FEEDERS))

ACK, META_CONTEXT = 1, 4
LIST, SET, GO, STRUCTURED = 9, 10, 7, 8
STRUCTURED_MAGIC = bytes.fromhex("668e33ef")
BLOCK_STATUS_CHUNK = 5
MiB = 1 << 20

EXPORTS = {
    "s2": ExportInfo("s2", 4 * MiB, ALL_FLAGS, minimum_block=512, dirty_bitmaps=("s1", "s0")),  # type: ignore[arg-type]
    "plain": ExportInfo("plain", MiB, ALL_FLAGS),  # type: ignore[arg-type]
}


def new_connection() -> ServerConnection:
    conn = ServerConnection(
        list_exports=lambda: [(e.name, e.description) for e in EXPORTS.values()],
        lookup_export=EXPORTS.get,
        default_export="s2",
    )
    assert conn.data_to_send() == GREETING
    return conn


def meta(opt: int, context_id: int, name: str) -> bytes:
    return option_reply(opt, META_CONTEXT, u32(context_id) + name.encode())


def chunk(handle: int, payload: bytes, done: bool) -> bytes:
    return (
        STRUCTURED_MAGIC
        + u16(1 if done else 0)
        + u16(BLOCK_STATUS_CHUNK)
        + u64(handle)
        + u32(len(payload))
        + payload
    )


@feeders
@pytest.mark.parametrize(
    ("queries", "listed"),
    [
        ((), ["base:allocation", "qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s0"]),  # everything
        (("qemu:",), ["qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s0"]),  # qemu's namespace wildcard
        (("qemu:dirty-bitmap:",), ["qemu:dirty-bitmap:s1", "qemu:dirty-bitmap:s0"]),
        (("qemu:dirty-bitmap:s0",), ["qemu:dirty-bitmap:s0"]),
        (
            ("qemu:dirty-bitmap:s0", "qemu:", "base:"),
            ["qemu:dirty-bitmap:s0", "qemu:dirty-bitmap:s1", "base:allocation"],
        ),
        (("qemu:dirty-bitmap:nosuch", "qemu:allocation-depth", "qemu:dirty-bitmap:s1x"), []),
    ],
    ids=["all", "qemu-wildcard", "bitmap-wildcard", "one", "each-once", "unknown"],
)
def test_list_meta_context_offers_the_exports_dirty_bitmaps(
    feed, queries: tuple[str, ...], listed: list[str]
) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(STRUCTURED) + option(LIST, meta_payload("s2", queries)))
    # "The metadata context ID in these replies is reserved and SHOULD be set to zero"
    assert conn.data_to_send() == (
        option_reply(STRUCTURED, ACK)
        + b"".join(meta(LIST, 0, name) for name in listed)
        + option_reply(LIST, ACK)
    )
    assert isinstance(events[-1], OptionRequest) and events[-1].reply == OptionReply.ACK


@feeders
def test_an_export_without_bitmaps_lists_base_allocation_alone(feed) -> None:
    conn = new_connection()
    feed(
        conn,
        u32(1)
        + option(STRUCTURED)
        + option(LIST, meta_payload("plain", ()))
        + option(LIST, meta_payload("plain", ("qemu:",))),
    )
    assert conn.data_to_send() == (
        option_reply(STRUCTURED, ACK)
        + meta(LIST, 0, "base:allocation")
        + option_reply(LIST, ACK)
        + option_reply(LIST, ACK)
    )


@feeders
def test_set_meta_context_selects_bitmaps_with_ids_after_base_allocation(feed) -> None:
    conn = new_connection()
    queries = (
        "qemu:dirty-bitmap:s0",
        "qemu:",
        "qemu:dirty-bitmap:",
        "base:allocation",
        "qemu:dirty-bitmap:nosuch",
        "qemu:dirty-bitmap:s0",
        "qemu:dirty-bitmap:s1",
    )
    events = feed(
        conn,
        u32(1)
        + option(STRUCTURED)
        + option(SET, meta_payload("s2", queries))
        + option(GO, info_payload("s2")),
    )
    out = conn.data_to_send()
    # The wildcards select nothing during SET ("SHOULD NOT select any contexts"), unknown names are
    # ignored, a name asked twice is selected once; each selected context has a unique id.
    assert out.startswith(
        option_reply(STRUCTURED, ACK)
        + meta(SET, 2, "qemu:dirty-bitmap:s0")
        + meta(SET, 1, "base:allocation")
        + meta(SET, 3, "qemu:dirty-bitmap:s1")
        + option_reply(SET, ACK)
    )
    chosen = events[-1]
    assert isinstance(chosen, ExportChosen) and chosen.base_allocation
    assert chosen.contexts == (
        MetaContext(2, "qemu:dirty-bitmap:s0", "s0"),
        MetaContext(1, "base:allocation"),
        MetaContext(3, "qemu:dirty-bitmap:s1", "s1"),
    )


@feeders
@pytest.mark.parametrize(
    "setup",
    [
        option(SET, meta_payload("plain", ("qemu:dirty-bitmap:s1",))),  # the other export has no such bitmap
        option(SET, meta_payload("s2", ("qemu:dirty-bitmap:s1",)))
        + option(SET, meta_payload("plain", ("base:allocation",))),
        option(SET, meta_payload("s2", ("qemu:dirty-bitmap:s1",)))
        + option(SET, meta_payload("s2", ())),  # cleared
    ],
    ids=["unknown-there", "set-for-another-export", "cleared"],
)
def test_a_bitmap_is_answered_only_for_the_export_it_was_selected_for(feed, setup: bytes) -> None:
    conn = new_connection()
    events = feed(conn, u32(1) + option(STRUCTURED) + setup + option(GO, info_payload("s2")))
    chosen = events[-1]
    assert isinstance(chosen, ExportChosen) and chosen.contexts == ()
    fresh = new_connection()  # the same negotiation, whole, then a BLOCK_STATUS (trailing bytes aside)
    fresh.receive_data(u32(1) + option(STRUCTURED) + setup + option(GO, info_payload("s2")))
    drain(fresh)
    fresh.receive_data(request(int(Command.BLOCK_STATUS), 1, 0, 512))
    (rejected,) = drain(fresh)
    assert isinstance(rejected, RequestRejected) and rejected.error == 22  # NBD_EINVAL


def _transmission(queries: tuple[str, ...]) -> ServerConnection:
    conn = new_connection()
    conn.receive_data(
        u32(1)
        + option(STRUCTURED)
        + option(SET, meta_payload("s2", queries))
        + option(GO, info_payload("s2"))
    )
    assert isinstance(drain(conn)[-1], ExportChosen)
    conn.data_to_send()
    return conn


def test_a_bitmap_alone_answers_with_its_own_context_id_and_dirty_bit() -> None:
    conn = _transmission(("qemu:dirty-bitmap:s1",))
    status = Request(7, Command.BLOCK_STATUS, CommandFlags(0), 0, MiB)
    # Bit 0 is NBD_STATE_DIRTY; the other bits are not the context's (reserved: zero).
    out = conn.reply_block_status(status, [(65536, 1), (65536, 1), (131072, 0xFE), (4 * MiB, 3)])
    assert out == chunk(
        7, u32(2) + u32(131072) + u32(1) + u32(131072) + u32(0) + u32(MiB - 262144) + u32(1), done=True
    )


def test_several_contexts_get_one_chunk_each_and_the_last_is_done() -> None:
    conn = _transmission(("base:allocation", "qemu:dirty-bitmap:s0"))
    status = Request(9, Command.BLOCK_STATUS, CommandFlags.REQ_ONE, 512, 4096)
    out = conn.reply_block_status(status, contexts=[(2, [(65536, 1)]), (1, [(1024, 3), (8192, 0)])])
    # "A successful block status request MUST have exactly one status chunk per negotiated metadata
    # context ID"; REQ_ONE: one descriptor each, none longer than the request.
    assert out == chunk(9, u32(2) + u32(4096) + u32(1), done=False) + chunk(
        9, u32(1) + u32(1024) + u32(3), done=True
    )


@pytest.mark.parametrize(
    "answers",
    [
        [(1, [(512, 0)])],  # a context missing
        [(1, [(512, 0)]), (2, [(512, 0)]), (2, [(512, 0)])],  # one twice
        [(1, [(512, 0)]), (3, [(512, 0)])],  # one never negotiated
        [(1, [(512, 0)]), (2, [])],  # a context without an extent
    ],
    ids=["missing", "twice", "unknown", "empty"],
)
def test_a_block_status_reply_must_answer_each_negotiated_context_once(answers: list) -> None:
    conn = _transmission(("base:allocation", "qemu:dirty-bitmap:s0"))
    status = Request(9, Command.BLOCK_STATUS, CommandFlags(0), 0, 4096)
    with pytest.raises(ReplyError):
        conn.reply_block_status(status, contexts=answers)
    with pytest.raises(ReplyError):  # extents alone are for a single context
        conn.reply_block_status(status, [(4096, 0)])


def test_bitmap_names_must_be_valid_context_names() -> None:
    with pytest.raises(ValueError):
        ExportInfo("x", MiB, dirty_bitmaps=("a" * 4096,))
