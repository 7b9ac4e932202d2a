"""Connection admission and the bounded refusal log (thinblock.netlimits)."""

from __future__ import annotations

import logging

import pytest

from thinblock.netlimits import CLIENT_FULL, LISTENER_FULL, ConnectionLimits, RefusalLog


def test_per_client_then_listener_limit() -> None:
    limits = ConnectionLimits(max_connections=5, max_per_client=2)
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") == CLIENT_FULL
    assert limits.admit("10.0.0.2") is None
    assert limits.admit(None) is None  # a Unix-socket client: the listener's limit only
    assert limits.admit(None) is None
    assert limits.open == 5
    assert limits.admit("10.0.0.3") == LISTENER_FULL
    limits.release("10.0.0.1")
    assert limits.of_client("10.0.0.1") == 1
    assert limits.admit("10.0.0.1") is None


def test_released_addresses_leave_nothing_behind() -> None:
    limits = ConnectionLimits(max_connections=0, max_per_client=1)
    for i in range(1000):
        address = f"10.0.{i // 256}.{i % 256}"
        assert limits.admit(address) is None
        limits.release(address)
    assert limits.open == 0 and limits.clients == 0


def test_release_without_admit_is_a_bug() -> None:
    with pytest.raises(AssertionError):
        ConnectionLimits(1).release("10.0.0.1")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_ten_thousand_refusals_write_a_bounded_number_of_lines(caplog: pytest.LogCaptureFixture) -> None:
    """10,000 refusals over 50 s with a 10 s interval: at most two lines per interval, and the
    lines account for every refusal."""
    clock = Clock()
    log = logging.getLogger("test.netlimits")
    refusals = RefusalLog(log, "test-refused", interval=10.0, clock=clock)
    caplog.set_level(logging.INFO, logger="test.netlimits")
    for i in range(10_000):
        clock.now = i * 0.005
        refusals.refused(f"peer#{i}", f"10.0.{i % 7}.1", LISTENER_FULL if i % 2 else CLIENT_FULL, "full")
    assert refusals.needs_flush_at is not None
    clock.now = refusals.needs_flush_at
    refusals.flush()
    lines = [r for r in caplog.records if getattr(r, "event", None) == "test-refused"]
    assert len(lines) == refusals.lines <= 2 * (50 // 10 + 1), [r.getMessage() for r in lines]
    assert sum(getattr(r, "refused", 1) for r in lines) == 10_000
    assert "from 7 addresses" in lines[-1].getMessage()


def test_a_lone_refusal_is_one_line_and_needs_no_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    refusals = RefusalLog(logging.getLogger("test.netlimits"), "test-refused", clock=clock)
    caplog.set_level(logging.INFO, logger="test.netlimits")
    refusals.refused("peer#1", "10.0.0.1", LISTENER_FULL, "256 connections on this listener already")
    assert refusals.needs_flush_at is None
    refusals.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "refusing connection peer#1: 256 connections on this listener already"
    ]
