"""Recording PD failures so that none is ever forgotten (issue 10 case 1).

A RAID 1 mirror that failed holds old data; if a restart forgets the failure, reads come from
it again and the resync after an unclean stop copies it over the good mirror.  So a failure is
recorded twice before anything more is acknowledged on the LDs of that PD:

1. on disk, md's way: the failure-event count and the set of failed PDs are written, durably,
   to the header of every PD still in service (``PDHeaders.record_event``); at open, the PDs
   the freshest record names are failed whatever the store says;
2. in the metadata store (``set_pd_health``), which the rest of the engine loads from.

Until both landed, every LD with a member on the failed PD is *fenced*: its writes raise
MediumError (``LogicalDisk.write_fence``) instead of being acknowledged; reads go on (they never
touch a failed PD).  A store that cannot take the record (its file system full, say) is retried
every ``RETRY_SECONDS`` until it does; then the fence lifts and the alerts are raised.

Threading: ``listener`` may run on any thread (a PD failing under an fsync in a worker thread):
it fences at once, then hands over to the event loop.  Everything else runs on the loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .alerts import AlertBus
from .logical.raid import LogicalDisk
from .metadata.store import MetadataStore
from .model import AlertKind, PDHealth, Severity
from .pdheaders import PDHeaders
from .physical.pd import PhysicalDisk

log = logging.getLogger("thinblock.failures")

RETRY_SECONDS = 1.0


class FailureRecorder:
    def __init__(
        self,
        *,
        store: MetadataStore,
        alerts: AlertBus,
        pds: dict[int, PhysicalDisk],
        lds: dict[int, LogicalDisk],
        refresh_ld_alerts: Callable[[], None],
    ) -> None:
        self.store = store
        self.alerts = alerts
        self.pds = pds  # the engine's own dicts, read live
        self.lds = lds
        self.headers = PDHeaders("", 0)  # the engine sets the loaded one
        self.refresh_ld_alerts = refresh_ld_alerts
        self.loop: asyncio.AbstractEventLoop | None = None
        # False while the engine opens: headers are verified first (a failure noted then is
        # recorded once the engine activates the recorder, never before the store-generation
        # check has read every header).
        self.active = False
        self.closed = False
        self.unrecorded: dict[int, str] = {}  # PD id -> failure reason, not yet in the store
        self._recording = False
        self._again = False
        self._retry: asyncio.TimerHandle | None = None

    # --- from the PDs -------------------------------------------------------------------
    def listener(self, pd: PhysicalDisk, reason: str) -> None:
        """A PD failure listener (any thread): fence its LDs now, record on the loop."""
        if self.closed:
            return
        self._fence_lds_of(pd.id, reason)
        loop = self.loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.on_failed(pd, reason)
        else:
            loop.call_soon_threadsafe(self.on_failed, pd, reason)

    def on_failed(self, pd: PhysicalDisk, reason: str) -> None:
        if self.closed:
            return
        self.unrecorded[pd.id] = reason
        if self.active:
            self.record()

    def activate(self) -> bool:
        """The engine has opened (headers verified, LDs loaded): record what was noted meanwhile."""
        self.active = True
        for pd_id, reason in self.unrecorded.items():
            self._fence_lds_of(pd_id, reason)
        return self.record()

    # --- recording ------------------------------------------------------------------------
    def record(self) -> bool:
        """Record every failure not yet recorded: headers, then the store.  True when all landed
        (fences lifted, alerts raised); False when the store refused (a retry is scheduled)."""
        if self._recording:  # a header write failed another PD: the running pass goes round again
            self._again = True
            return False
        self._recording = True
        try:
            while True:
                self._again = False
                failed = frozenset(pd_id for pd_id, pd in self.pds.items() if pd.failed)
                self.headers.record_event(failed, self.pds.values())
                landed = self._record_in_store()
                if not self._again:
                    break
        finally:
            self._recording = False
        if landed:
            for ld in self.lds.values():
                ld.write_fence = None
        try:
            self.refresh_ld_alerts()
        except Exception:
            log.exception("LD alerts could not be raised")
        if not landed:
            self._schedule_retry()
        return landed

    def _record_in_store(self) -> bool:
        for pd_id, reason in list(self.unrecorded.items()):
            pd = self.pds.get(pd_id)
            if pd is None:  # removed meanwhile
                self.unrecorded.pop(pd_id, None)
                continue
            try:
                self.store.set_pd_health(pd_id, PDHealth.FAILED.value)
            except Exception as exc:
                lds = sorted(ld.id for ld in self.lds.values() if ld.write_fence is not None)
                log.error(
                    "cannot record the failure of PD %d in the metadata store (%s): writes to LD(s) %s"
                    " are refused until it is; retrying every %.0f s",
                    pd_id,
                    exc,
                    ", ".join(map(str, lds)) or "-",
                    RETRY_SECONDS,
                    extra={"event": "pd-failure-unrecorded", "pd": pd_id},
                )
                return False
            del self.unrecorded[pd_id]
            try:
                self.alerts.condition(
                    AlertKind.PD_FAILED,
                    f"pd:{pd_id}",
                    Severity.CRITICAL,
                    f"PD {pd_id} ({pd.path}) failed: {reason}",
                )
            except Exception:
                log.exception("the pd-failed alert for PD %d could not be raised", pd_id)
        return True

    def _schedule_retry(self) -> None:
        if self._retry is None and self.loop is not None and not self.closed:
            self._retry = self.loop.call_later(RETRY_SECONDS, self._run_retry)

    def _run_retry(self) -> None:
        self._retry = None
        if self.closed:
            return
        for pd_id, reason in self.unrecorded.items():  # LDs created since are fenced too
            self._fence_lds_of(pd_id, reason)
        if self.record():
            log.warning(
                "PD failures recorded in the metadata store: writes accepted again",
                extra={"event": "pd-failure-recorded"},
            )

    def _fence_lds_of(self, pd_id: int, reason: str) -> None:
        fence = (
            f"PD {pd_id} failed ({reason}) and its failure is not recorded yet: writes to its LDs are"
            " refused until it is"
        )
        for ld in list(self.lds.values()):
            if any(pd.id == pd_id for pd in ld.pds):
                ld.write_fence = fence

    def close(self) -> None:
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
