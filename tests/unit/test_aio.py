"""aio.start_eager: run a coroutine inline until it first suspends."""

from __future__ import annotations

import asyncio

import pytest

from thinblock.aio import start_eager


async def _value(x: int) -> int:
    return x * 2


async def _raises() -> None:
    raise ValueError("boom")


async def test_a_coroutine_that_never_suspends_completes_inline() -> None:
    assert start_eager(_value(21)) == (True, 42)
    with pytest.raises(ValueError, match="boom"):
        start_eager(_raises())


async def test_a_suspending_coroutine_continues_in_a_task() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def waits() -> int:
        steps.append("before")
        value = await fut
        steps.append("after")
        return value + 1

    done, task = start_eager(waits())
    assert not done and steps == ["before"]
    fut.set_result(1)
    assert await task == 2
    assert steps == ["before", "after"]


async def test_several_eager_coroutines_may_await_one_shared_future() -> None:
    """The first Task to take the shared future clears its blocking flag; the others must still work
    (this broke write-through writes that shared one group-commit future)."""
    shared: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def waiter(i: int) -> str:
        return f"{await shared}-{i}"

    tasks = []
    for i in range(5):
        done, task = start_eager(waiter(i))
        assert not done
        tasks.append(task)
    await asyncio.sleep(0)  # every Task takes its first step
    shared.set_result("ok")
    assert await asyncio.gather(*tasks) == [f"ok-{i}" for i in range(5)]


async def test_cancellation_reaches_the_coroutine() -> None:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    cleaned = []

    async def waits() -> None:
        try:
            await fut
        finally:
            cleaned.append(True)

    done, task = start_eager(waits())
    assert not done
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True]
