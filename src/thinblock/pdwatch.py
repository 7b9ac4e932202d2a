"""Watching the PDs while serving (issue 10, host faults): one role, taken out of the engine.

* **Identity.**  Every ``interval`` seconds each PD in service is checked against what was
  formatted (its file still there, same size, its header still the one written: pdheaders.py);
  a PD truncated or replaced under the daemon is failed (case 4).  I/O errors check the file too
  (``PhysicalDisk.file_problem``), so the timer is the backstop for a PD nothing reads.
* **Host file system full.**  A PD on a file whose host file system had no room (``ENOSPC``
  from any thread: ``PhysicalDisk.on_no_space``) raises ``pd-host-full`` once per episode; the
  PD stays in service (written data stays readable, writes that need new space fail).  The same
  timer clears the alert once ``HOST_ROOM_AGAIN`` bytes are free again.

Everything runs on the loop; ``no_space`` hops there from an I/O thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from .alerts import AlertBus
from .model import AlertKind, Severity
from .pdheaders import PDHeaders
from .physical.pd import PhysicalDisk
from .units import MiB

log = logging.getLogger("thinblock.engine")

HOST_ROOM_AGAIN = 1 * MiB  # free bytes under a PD that end a pd-host-full alert


class PDWatch:
    """See the module docstring.  ``pds`` is the engine's own dictionary (shared, not copied);
    ``headers`` returns the engine's current PD headers (replaced by the engine's load)."""

    def __init__(
        self,
        *,
        pds: dict[int, PhysicalDisk],
        headers: Callable[[], PDHeaders],
        alerts: AlertBus,
        loop: asyncio.AbstractEventLoop,
        interval: float,
    ) -> None:
        self._pds = pds
        self._headers = headers
        self._alerts = alerts
        self._loop = loop
        self._interval = interval
        self._timer: asyncio.TimerHandle | None = None
        self._stopped = False

    # --- life cycle ---
    def start(self) -> None:
        """Check every ``interval`` seconds from now (never when the interval is 0)."""
        if self._interval > 0 and not self._stopped:
            self._timer = self._loop.call_later(self._interval, self._tick)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        if self._stopped:
            return
        try:
            self.check_identity()
            self.clear_host_full()
        except Exception:
            log.exception("the periodic PD check failed")
        self.start()

    # --- identity ---
    def check_identity(self) -> int:
        """Fail every PD in service whose file or header is no longer what was formatted (issue 10
        case 4: a PD file truncated or replaced while serving); how many were failed."""
        problems = self._headers().identity_problems(self._pds.values())
        for pd, problem in problems.items():
            if not pd.failed:
                pd.fail(f"identity check: {problem}")
        return len(problems)

    # --- the host file system under a PD ---
    def no_space(self, pd: PhysicalDisk, message: str) -> None:
        """A PD's host file system had no room (any thread): an alert, once per episode; the
        periodic check clears it when room is back.  The PD stays in service."""
        if self._stopped:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not self._loop:
            self._loop.call_soon_threadsafe(self.no_space, pd, message)
            return
        try:
            self._alerts.condition(
                AlertKind.PD_HOST_FULL,
                f"pd:{pd.id}",
                Severity.CRITICAL,
                f"the host file system under PD {pd.id} ({pd.path}) is full: writes that need new"
                " space fail with ENOSPC; written data stays readable",
            )
        except Exception as exc:  # the store may live on the same full file system
            log.error("the pd-host-full alert for PD %d could not be stored: %s", pd.id, exc)

    def clear_host_full(self) -> None:
        for pd in self._pds.values():
            obj = f"pd:{pd.id}"
            if self._alerts.is_open(AlertKind.PD_HOST_FULL, obj):
                free = pd.host_free_bytes()
                if free is not None and free >= HOST_ROOM_AGAIN:
                    try:
                        self._alerts.clear(AlertKind.PD_HOST_FULL, obj)
                    except Exception as exc:
                        log.error("the pd-host-full alert for PD %d could not be cleared: %s", pd.id, exc)
