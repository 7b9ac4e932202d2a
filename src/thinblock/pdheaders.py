"""The engine's side of the PD headers (format: physical/header.py).

What the headers hold for the engine, and the rules kept with them:

* **Identity.**  The data directory's id is made once (first open of an empty store) and kept
  in the store's ``meta`` table; each PD's header carries it with the PD's id and size.  At
  open every PD's header is checked against the store; a PD whose header is missing or names
  another PD, another data directory or another size is failed with that reason, never served.
* **Store generation.**  A counter in the store (``meta.generation``) that the engine bumps at
  every flush that committed metadata since the last bump; once the store is synced, the new
  value goes into every PD header.  A header can therefore never be ahead of a store that kept
  all its commits: at open, a store whose generation is below a PD header's lost commits that
  a completed flush relied on (its WAL deleted after a crash, an old copy restored), and the
  engine refuses to start, naming it (``StoreBehindData``).  A store whose file system is full
  takes the bump's commit in the room of its reserve (``metadata/reserve.py``).
* **Failure events** (md's event counter).  Each PD failure bumps ``events``; the new count and
  the set of failed PDs go into the header of every PD in service before the engine
  acknowledges anything more on the LDs of the failed PD.  At open, the PDs named failed by
  the freshest record are failed, even if the store says "normal" (its update may have been
  lost), so a stale mirror is never read or resynchronised over a good one.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import MediumError, MetadataCorrupt, MetadataStoreFull, ThinblockError
from .metadata.reserve import StoreReserve
from .metadata.store import MetadataStore
from .physical.header import HeaderError, PDHeader, check_header, new_data_dir_id, read_header
from .physical.pd import PhysicalDisk

log = logging.getLogger("thinblock.pdheaders")

DATA_DIR_ID_KEY = "data_dir_id"
GENERATION_KEY = "generation"


class StoreBehindData(MetadataCorrupt):
    """The store is older than the data on the PDs: it lost commits a flush relied on."""


@dataclass
class OpenFindings:
    """What the PD headers said at open."""

    wrong: dict[int, str] = field(default_factory=dict)  # pd id -> why its header is not its own
    stale: dict[int, str] = field(default_factory=dict)  # pd id -> the failure record naming it
    newest_generation: int = 0
    newest_generation_pd: int | None = None


class PDHeaders:
    """The data directory's identity, store generation and failure-event count, and the writing
    of them to PD headers.  Event-loop thread, except ``write_all`` (blocking; any thread)."""

    def __init__(self, data_dir_id: str, generation: int) -> None:
        self.data_dir_id = data_dir_id
        self.generation = generation  # the store generation known durable, carried by headers
        self.events = 0
        self.failed: frozenset[int] = frozenset()
        # Header writes come from the loop (failure events) and from flush threads (generation):
        # one at a time, or two could pick the same slot of a PD (physical/header.py).
        self._write_lock = threading.Lock()
        self._changes_at_bump: int | None = None  # the store's change count at the last bump

    @classmethod
    def load(cls, store: MetadataStore, has_pds: bool) -> PDHeaders:
        """The data directory's id from the store (made now for a store without PDs) and its
        generation.  MetadataCorrupt for a store with PDs and no id: it was made before PD
        headers existed, and its PDs have chunklets where headers now go."""
        data_dir_id = store.get_meta(DATA_DIR_ID_KEY)
        if data_dir_id is None:
            if has_pds:
                raise MetadataCorrupt(
                    "the store names PDs but has no data directory id: it was made by a thinblock"
                    " without PD headers (or lost its first commits); this version cannot use it"
                )
            data_dir_id = new_data_dir_id()
            store.set_meta(DATA_DIR_ID_KEY, data_dir_id)
        raw = store.get_meta(GENERATION_KEY)
        try:
            generation = int(raw) if raw is not None else 0
        except ValueError:
            raise MetadataCorrupt(f"the store's generation is {raw!r}, not a number") from None
        return cls(data_dir_id, generation)

    def header_for(self, pd: PhysicalDisk) -> PDHeader:
        return PDHeader(
            pd_id=pd.id,
            data_dir_id=self.data_dir_id,
            size=pd.size,
            chunklet_size=pd.chunklet_size,
            data_offset=pd.data_offset,
            store_generation=self.generation,
            events=self.events,
            failed_pds=self.failed,
        )

    def check_pd(self, pd: PhysicalDisk) -> tuple[PDHeader | None, str | None]:
        """Read and check ``pd``'s header: (header, None) when it is this PD's, else (header or
        None, why not).  A PD already failed is not read."""
        try:
            header = pd.read_header()
        except HeaderError as exc:
            return None, str(exc)
        except MediumError as exc:
            return None, f"its header cannot be read: {exc}"
        problem = check_header(
            header, pd_id=pd.id, data_dir_id=self.data_dir_id, size=pd.size, chunklet_size=pd.chunklet_size
        )
        return header, problem

    def verify_at_open(self, pds: Iterable[PhysicalDisk]) -> OpenFindings:
        """Read every healthy PD's header: which are not what the store says, which the freshest
        failure record names, the highest store generation seen.  Sets ``events`` and ``failed``
        from the freshest record.  Changes nothing on disk."""
        findings = OpenFindings()
        headers: dict[int, PDHeader] = {}
        for pd in pds:
            if pd.failed:
                continue
            header, problem = self.check_pd(pd)
            if problem is not None:
                findings.wrong[pd.id] = problem
                continue
            assert header is not None
            headers[pd.id] = header
            if header.store_generation > findings.newest_generation:
                findings.newest_generation = header.store_generation
                findings.newest_generation_pd = pd.id
        if headers:
            newest = max(h.events for h in headers.values())
            failed: set[int] = set()
            for pd_id, header in headers.items():
                if header.events == newest:
                    failed |= header.failed_pds
                    witness = pd_id
            self.events = newest
            self.failed = frozenset(failed)
            for pd_id in failed:
                if pd_id not in findings.wrong:
                    findings.stale[pd_id] = (
                        f"the failure record in PD {witness}'s header (event {newest}) names it failed:"
                        " it may have missed writes, its data is not trusted"
                    )
        return findings

    def refuse_if_store_behind(self, findings: OpenFindings) -> None:
        if findings.newest_generation > self.generation:
            raise StoreBehindData(
                f"the metadata store is older than the data: its generation is {self.generation},"
                f" PD {findings.newest_generation_pd}'s header says {findings.newest_generation}"
                " (the store lost commits that a completed flush relied on: its WAL deleted or an"
                " old copy put back?); refusing to start rather than serve a rolled-back store"
            )

    def identity_problems(self, pds: Iterable[PhysicalDisk]) -> dict[PhysicalDisk, str]:
        """PDs in service whose file is no longer what was formatted (cut short, replaced,
        removed) or whose header is no longer theirs: the engine's periodic check.  Cheap: an
        fstat, a stat and two 4 KiB reads (page cache) per PD."""
        problems: dict[PhysicalDisk, str] = {}
        for pd in pds:
            if pd.failed or pd.fd < 0:
                continue
            problem = pd.file_problem()
            if problem is None:
                _, problem = self.check_pd(pd)
            if problem is not None:
                problems[pd] = problem
        return problems

    # --- the store generation -------------------------------------------------------------
    def start_counting(self, store: MetadataStore) -> None:
        """After open: changes from now on call for a bump at the next flush."""
        self._changes_at_bump = store.change_count()

    def bump_if_changed(self, store: MetadataStore, reserve: StoreReserve | None = None) -> int | None:
        """At a flush, after the flush's commit, on the flush's thread (a round trip with a remote
        store; flushes run one at a time): when the store changed since the last bump, commit
        generation + 1 to it and return that number (``publish`` it once the store is synced);
        None when nothing changed.

        Why this rule is enough: a store rolled back to before some commit C that a completed
        flush F relied on is rolled back to before F's bump as well (SQLite keeps a prefix of its
        commits: a checkpoint copies the WAL in order), and F's bump is on every PD header when F
        completes; flushes that changed nothing add nothing a rollback could lose.

        A store whose file system is full gets the room of ``reserve`` (metadata/reserve.py) for
        this commit: the reserve is deleted and the commit tried once more."""
        count = store.change_count()
        if count >= 0 and count == self._changes_at_bump:
            return None
        generation = self.generation + 1
        try:
            try:
                store.set_meta(GENERATION_KEY, str(generation))
            except MetadataStoreFull as exc:
                if reserve is None or not reserve.release():
                    raise
                log.warning(
                    "the store is full (%s): its reserve %s was released for the store generation's bump",
                    exc,
                    reserve.path,
                    extra={"event": "store-reserve-released"},
                )
                store.set_meta(GENERATION_KEY, str(generation))
        except ThinblockError as exc:  # MetadataStoreFull, MetadataUnavailable, MetadataCorrupt
            # The store cannot commit (its file system full, say): the flush goes on -- its data
            # and every commit that did land are made durable -- and the next flush tries again.
            # Until one succeeds, a store losing its WAL as well would not be noticed: two faults.
            log.warning(
                "the store generation could not be bumped at this flush (%s); the next flush retries",
                exc,
                extra={"event": "generation-not-bumped"},
            )
            return None
        # The loop may commit while this thread bumps: the count is taken as of the bump only
        # when the bump was the one change since ``count`` (else the next flush bumps again).
        after = store.change_count()
        self._changes_at_bump = after if after == count + 1 else count
        return generation

    def publish(self, generation: int, pds: Iterable[PhysicalDisk]) -> list[tuple[PhysicalDisk, MediumError]]:
        """The store holds ``generation`` durably now (synced): headers may carry it.  Blocking."""
        with self._write_lock:
            if generation > self.generation:
                self.generation = generation
        return self.write_all(pds)

    def record_event(
        self, failed: frozenset[int], pds: Iterable[PhysicalDisk]
    ) -> list[tuple[PhysicalDisk, MediumError]]:
        """A failure event: the set of failed PDs is now ``failed``; bump ``events`` and write the
        record to every PD in service, durably (blocking).  Nothing when the set is unchanged."""
        with self._write_lock:
            if failed == self.failed:
                return []
            self.events += 1
            self.failed = failed
        return self.write_all(pds)

    def write_all(self, pds: Iterable[PhysicalDisk]) -> list[tuple[PhysicalDisk, MediumError]]:
        """Write the current record to every PD in service, durably.  Blocking.  A PD whose
        header write fails is failed by it (its failure listeners run); returned with the error."""
        failures: list[tuple[PhysicalDisk, MediumError]] = []
        with self._write_lock:
            for pd in list(pds):
                if pd.failed or pd.fd < 0:
                    continue
                try:
                    pd.write_header(self.header_for(pd))
                except MediumError as exc:
                    failures.append((pd, exc))
        return failures


def offline_problems(store: MetadataStore) -> list[str]:
    """For ``thinblock check``: PD headers (read-only) that show the store older than the data.
    PDs that cannot be read, or whose header is not theirs, are the daemon's business (it fails
    them at start) and not reported here."""
    data_dir_id = store.get_meta(DATA_DIR_ID_KEY)
    raw = store.get_meta(GENERATION_KEY)
    if data_dir_id is None or (raw is not None and not raw.isdigit()):
        return []
    generation = int(raw or 0)
    problems = []
    for row in store.load_pds():
        try:
            fd = os.open(row.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            header = read_header(fd)
        except (OSError, HeaderError):
            continue
        finally:
            os.close(fd)
        if header is None or header.data_dir_id != data_dir_id or header.pd_id != row.id:
            continue
        if header.store_generation > generation:
            problems.append(
                f"the metadata store is older than the data: its generation is {generation},"
                f" PD {row.id}'s header says {header.store_generation} (it lost commits a flush relied on)"
            )
    return problems
