"""The Azure provider's shared in-flight-bytes budget (``ByteBudget``): the bound, its order, cancellation."""

from __future__ import annotations

import asyncio
import random

import pytest

from sidecar.providers.azureblob.store import ByteBudget

pytestmark = pytest.mark.anyio


async def test_holders_never_exceed_the_limit() -> None:
    budget = ByteBudget(100)
    held = peak = 0

    async def hold(nbytes: int) -> None:
        nonlocal held, peak
        async with budget.hold(nbytes):
            held += nbytes
            peak = max(peak, held)
            await asyncio.sleep(random.random() / 200)
            held -= nbytes

    sizes = [random.randint(1, 60) for _ in range(300)]
    await asyncio.gather(*(hold(n) for n in sizes))
    assert 100 >= peak > 60, "several holders at once, never more than the limit"
    assert budget.free == 100, "everything was given back"


async def test_a_large_request_is_not_overtaken_by_later_small_ones() -> None:
    budget = ByteBudget(10)
    await budget.acquire(8)
    order: list[str] = []

    async def take(name: str, nbytes: int) -> None:
        await budget.acquire(nbytes)
        order.append(name)

    large = asyncio.create_task(take("large", 10))
    await asyncio.sleep(0)
    small = asyncio.create_task(take("small", 1))  # would fit now, but the large one waits first
    await asyncio.sleep(0.01)
    assert order == [] and budget.free == 2
    budget.release(8)
    await large
    assert order == ["large"] and not small.done()
    budget.release(10)
    await small
    assert order == ["large", "small"] and budget.free == 9


async def test_a_cancelled_wait_holds_nothing_and_lets_the_next_in() -> None:
    budget = ByteBudget(10)
    await budget.acquire(6)
    blocked = asyncio.create_task(budget.acquire(8))
    behind = asyncio.create_task(budget.acquire(4))
    await asyncio.sleep(0.01)
    assert not blocked.done() and not behind.done()
    blocked.cancel()
    await asyncio.gather(blocked, return_exceptions=True)
    await asyncio.wait_for(behind, 1)
    assert budget.free == 0
    budget.release(6)
    budget.release(4)
    assert budget.free == 10


async def test_a_request_above_the_limit_holds_the_whole_budget() -> None:
    budget = ByteBudget(10)
    async with budget.hold(25):
        assert budget.free == 0
    assert budget.free == 10
