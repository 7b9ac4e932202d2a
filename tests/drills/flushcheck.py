"""The write-back checker of drill 1: it knows which writes each completed FLUSH covers, and after
a crash checks exactly what NBD promises, no more.

NBD's promise (doc/proto.md, NBD_CMD_FLUSH): when a flush completes, every write the server had
*completed* (replied to) before it received the flush is on permanent storage.  The client side
of that, without guessing at timing: a write whose reply the client had received before it sent
the flush is covered by that flush once the flush's reply arrives.

So, per 4 KiB block, the checker keeps the writes issued to it in order (never two in flight to
the same block, so the order is the order on the block) and the last write a completed flush
covers, ``durable``.  After a crash the block must hold that write or one issued after it (acked
or not: unflushed writes may or may not have landed); a block with no covered write in this epoch
may hold its value from the start of the epoch or any later write.  Anything else -- zeros where a
flushed write was, an older write, another block's or another volume's data, garbage -- is data
lost.

An *epoch* starts after each verification: what was read back becomes the baseline, and a flush
makes it durable before new writes begin.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from tests.drills.harness import BLOCK, block_data, decode_block
from tests.drills.nbd_client import ConnectionLost, NBDClient, NBDError


@dataclass
class Mismatch:
    block: int
    found: str
    allowed: list[int]
    durable: int | None

    def __str__(self) -> str:
        return (
            f"block {self.block}: found {self.found}, allowed writes {self.allowed[:8]}"
            f" (last flushed write {self.durable})"
        )


@dataclass
class CheckerStats:
    writes_sent: int = 0
    writes_acked: int = 0
    flushes_done: int = 0
    blocks_flushed: int = 0  # block writes covered by a completed flush
    bytes_verified: int = 0
    errors: list[str] = field(default_factory=list)


class FlushChecker:
    """Random writes of 1-8 blocks to one volume, flushes now and then, and the check after a crash."""

    def __init__(
        self, tag: int, blocks: int, rng: random.Random, *, depth: int = 8, flush_every: int = 24
    ) -> None:
        self.tag = tag
        self.blocks = blocks
        self.rng = rng
        self.depth = depth
        self.flush_every = flush_every
        self.seq = 0  # global over epochs, so that every write's data is distinct
        self.baseline: dict[int, int] = {}  # block -> write seq at the start of the epoch (0: zeros)
        self.history: dict[int, list[int]] = {}  # block -> writes issued to it in this epoch
        self.durable: dict[int, int] = {}  # block -> last write covered by a completed flush
        self.stats = CheckerStats()

    # --- writing ---
    async def run(self, client: NBDClient, stop: asyncio.Event) -> None:
        """Write until ``stop`` is set or the connection is lost (the server was killed)."""
        busy: set[int] = set()
        acked_not_flushed: list[tuple[int, int, int]] = []  # (first block, count, seq)
        slots = asyncio.Semaphore(self.depth)
        tasks: set[asyncio.Task[None]] = set()
        lost = asyncio.Event()
        flush_running = False

        async def write(first: int, count: int, seq: int) -> None:
            try:
                data = b"".join(block_data(self.tag, first + i, seq) for i in range(count))
                await client.write(first * BLOCK, data)
            except (ConnectionLost, NBDError) as exc:
                if isinstance(exc, NBDError):
                    self.stats.errors.append(f"write of blocks {first}+{count}: {exc}")
                lost.set()
                return
            finally:
                busy.difference_update(range(first, first + count))
                slots.release()
            self.stats.writes_acked += 1
            acked_not_flushed.append((first, count, seq))

        async def flush(covered: list[tuple[int, int, int]]) -> None:
            nonlocal flush_running
            try:
                await client.flush()
            except (ConnectionLost, NBDError) as exc:
                if isinstance(exc, NBDError):
                    self.stats.errors.append(f"flush: {exc}")
                lost.set()
                return
            finally:
                flush_running = False
            self.stats.flushes_done += 1
            for first, count, seq in covered:
                for b in range(first, first + count):
                    if self.durable.get(b, -1) < seq:
                        self.durable[b] = seq
                self.stats.blocks_flushed += count

        while not stop.is_set() and not lost.is_set():
            await slots.acquire()
            if stop.is_set() or lost.is_set():
                slots.release()
                break
            if len(acked_not_flushed) >= self.flush_every and not flush_running:
                # The snapshot is taken as the flush is sent: exactly the writes acked before it.
                covered, acked_not_flushed[:] = list(acked_not_flushed), []
                flush_running = True
                task = asyncio.create_task(flush(covered))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            first, count = self._pick(busy)
            if count == 0:
                slots.release()
                await asyncio.sleep(0.001)
                continue
            self.seq += 1
            seq = self.seq
            busy.update(range(first, first + count))
            for b in range(first, first + count):
                self.history.setdefault(b, []).append(seq)
            self.stats.writes_sent += 1
            task = asyncio.create_task(write(first, count, seq))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _pick(self, busy: set[int]) -> tuple[int, int]:
        for _ in range(16):
            count = self.rng.choice((1, 1, 2, 4, 8))
            first = self.rng.randrange(0, self.blocks - count + 1)
            if not busy.intersection(range(first, first + count)):
                return first, count
        return 0, 0

    # --- checking ---
    def allowed(self, block: int) -> list[int]:
        """The writes (0: the zeros a fresh volume reads) block ``block`` may hold after a crash."""
        issued = self.history.get(block, [])
        durable = self.durable.get(block)
        if durable is not None:
            return [s for s in issued if s >= durable]
        return [self.baseline.get(block, 0), *issued]

    async def verify(self, client: NBDClient) -> tuple[list[Mismatch], dict[int, int]]:
        """Read the whole area back; the mismatches, and what each block holds (for the next epoch)."""
        data = await client.read_all(0, self.blocks * BLOCK)
        self.stats.bytes_verified += len(data)
        mismatches: list[Mismatch] = []
        observed: dict[int, int] = {}
        view = memoryview(data)
        for b in range(self.blocks):
            found = decode_block(view[b * BLOCK : (b + 1) * BLOCK])
            allowed = self.allowed(b)
            if found.kind == "zeros":
                seq = 0
            elif found.kind == "pattern" and found.tag == self.tag and found.block == b:
                seq = found.seq
            else:
                mismatches.append(Mismatch(b, str(found), allowed, self.durable.get(b)))
                continue
            if seq not in allowed:
                mismatches.append(Mismatch(b, str(found), allowed, self.durable.get(b)))
                continue
            observed[b] = seq
        return mismatches, observed

    def new_epoch(self, observed: dict[int, int]) -> None:
        """After a verification (and a flush making it durable): what was read is the baseline."""
        self.baseline = {b: s for b, s in observed.items() if s}
        self.history.clear()
        self.durable.clear()

    @property
    def flushed_blocks_in_epoch(self) -> int:
        return len(self.durable)
