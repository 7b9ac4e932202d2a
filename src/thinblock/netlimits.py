"""Connection admission for a listener: how many connections it holds, how many one client
address may hold, and a log of refusals that stays bounded under a flood.

Front-end neutral (no asyncio, no sockets): the NBD server keeps one ``ConnectionLimits`` per
listening socket and asks it at every accept; the iSCSI listener may do the same.

Why both limits.  A listener-wide limit alone lets one client take every slot: 255 idle
connections from one host once locked every other NBD client out.  A limit per client address
leaves the rest of the listener to everyone else; the listener-wide limit still caps the memory
all connections together may hold.  Unix-socket clients have no address and count only against
the listener's limit.

Why a refusal log of its own.  Each refused connection used to be one warning: 10,000 refused
connections wrote 10,001 log lines, so a client could fill the disk with the server's own log.
``RefusalLog`` writes the first refusal of an interval as it happens and counts the rest; when
the interval ends it writes one summary line (how many, for which reasons, from how many
addresses).  At most two lines per interval, whatever the rate; every refusal is still counted
(the server's metrics), so nothing is hidden from monitoring.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

LISTENER_FULL = "listener-limit"
CLIENT_FULL = "client-limit"
STOPPING = "stopping"
REFUSAL_REASONS = (LISTENER_FULL, CLIENT_FULL, STOPPING)
DEFAULT_LOG_INTERVAL = 10.0  # seconds between refusal log lines


class ConnectionLimits:
    """Slots of one listener: ``max_connections`` in all, ``max_per_client`` per client address
    (0: no limit of that kind)."""

    def __init__(self, max_connections: int, max_per_client: int = 0) -> None:
        if max_connections < 0 or max_per_client < 0:
            raise ValueError("connection limits cannot be negative")
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.open = 0
        self._per_client: Counter[str] = Counter()

    def admit(self, client: str | None) -> str | None:
        """Take a slot for a connection from ``client`` (an address; None on a Unix socket):
        None when admitted (``release`` it later), else the reason it is refused."""
        if self.max_connections and self.open >= self.max_connections:
            return LISTENER_FULL
        if client is not None and self.max_per_client and self._per_client[client] >= self.max_per_client:
            return CLIENT_FULL
        self.open += 1
        if client is not None:
            self._per_client[client] += 1
        return None

    def release(self, client: str | None) -> None:
        assert self.open > 0, "a connection slot released twice"
        self.open -= 1
        if client is not None:
            left = self._per_client[client] - 1
            assert left >= 0, f"a slot of {client} released twice"
            if left:
                self._per_client[client] = left
            else:
                del self._per_client[client]  # an address gone leaves nothing behind

    def of_client(self, client: str) -> int:
        return self._per_client.get(client, 0)

    @property
    def clients(self) -> int:
        """Addresses holding at least one connection."""
        return len(self._per_client)


@dataclass
class _Burst:
    started: float
    counts: Counter[str] = field(default_factory=Counter)
    addresses: set[str] = field(default_factory=set)
    suppressed: int = 0


class RefusalLog:
    """Refused connections written to ``logger`` at most twice per ``interval``: the first as it
    happens, the rest as one summary when the interval is over (``flush``, which the owner calls
    when ``needs_flush_at`` says; a later refusal past the interval flushes too)."""

    # Addresses remembered per interval for the summary; beyond this they are only counted.
    MAX_ADDRESSES = 1024

    def __init__(
        self,
        logger: logging.Logger,
        event: str,
        what: str = "connection",
        interval: float = DEFAULT_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._event = event
        self._what = what
        self.interval = interval
        self.clock = clock
        self._burst: _Burst | None = None
        self.lines = 0  # log lines written (for tests and for the curious)

    def refused(self, peer: str, address: str | None, reason: str, detail: str) -> None:
        now = self.clock()
        burst = self._burst
        if burst is not None and now - burst.started >= self.interval:
            self.flush()
            burst = None
        if burst is None:
            self._burst = _Burst(now)
            self._emit(logging.WARNING, "refusing %s %s: %s", self._what, peer, detail, reason=reason)
            return
        burst.suppressed += 1
        burst.counts[reason] += 1
        if address is not None and len(burst.addresses) < self.MAX_ADDRESSES:
            burst.addresses.add(address)

    @property
    def needs_flush_at(self) -> float | None:
        """When the summary of the current interval is due (clock time), or None."""
        burst = self._burst
        if burst is None or not burst.suppressed:
            return None
        return burst.started + self.interval

    def flush(self) -> None:
        """Write the summary of the refusals counted since the last line, if any."""
        burst = self._burst
        self._burst = None
        if burst is None or not burst.suppressed:
            return
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(burst.counts.items()))
        many = len(burst.addresses) >= self.MAX_ADDRESSES
        self._emit(
            logging.WARNING,
            "refused %d more %ss in %.0f s (%s) from %s%d addresses",
            burst.suppressed,
            self._what,
            max(self.clock() - burst.started, self.interval),
            reasons,
            "at least " if many else "",
            len(burst.addresses),
            reason="summary",
            refused=burst.suppressed,
        )

    def _emit(self, level: int, message: str, *args: object, **extra: object) -> None:
        self.lines += 1
        self._log.log(level, message, *args, extra={"event": self._event, **extra})


__all__ = [
    "CLIENT_FULL",
    "LISTENER_FULL",
    "REFUSAL_REASONS",
    "STOPPING",
    "ConnectionLimits",
    "RefusalLog",
]
