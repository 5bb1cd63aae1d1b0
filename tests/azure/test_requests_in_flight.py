"""The Azure provider bounds the number of requests in flight, not only their bytes: the smallest legal
chunk size (64 KiB) under the default 32 MiB budget must not put hundreds of requests on the wire."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sidecar.bounds import KiB, MiB
from sidecar.providers.azureblob.store import MAX_REQUESTS_IN_FLIGHT, ByteBudget, azure_blob_store
from testsupport.azurite import Azurite, azure_config, peak_requests_in_flight

pytestmark = pytest.mark.anyio


async def test_budget_with_max_holders_grants_at_most_that_many() -> None:
    budget = ByteBudget(32 * MiB, max_holders=8)
    held = peak = 0

    async def hold() -> None:
        nonlocal held, peak
        async with budget.hold(64 * KiB):
            held += 1
            peak = max(peak, held)
            await asyncio.sleep(0.005)
            held -= 1

    await asyncio.gather(*(hold() for _ in range(100)))
    assert peak == 8 and budget.free == 32 * MiB


async def test_small_chunks_keep_requests_in_flight_bounded(azurite: Azurite, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    chunk = 64 * KiB
    store = azure_blob_store(azure_config(azurite, chunkbytes=chunk, inflightbytes=32 * MiB))
    data = {name: os.urandom(160 * chunk - 3) for name in ("a", "b")}
    up, peak = await peak_requests_in_flight(store, tmp_path, data, 0.05, monkeypatch.setattr)
    # 32 MiB of 64 KiB chunks would allow 512 at once; the count bound allows MAX_REQUESTS_IN_FLIGHT.
    assert 8 < up <= MAX_REQUESTS_IN_FLIGHT and 8 < peak <= MAX_REQUESTS_IN_FLIGHT, (up, peak)
