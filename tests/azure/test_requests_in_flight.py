"""The Azure provider bounds the number of requests in flight, not only their bytes: the smallest legal
chunk size (64 KiB) under the default 32 MiB budget must not put hundreds of requests on the wire."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from azure.storage.blob.aio import BlobClient

from sidecar.providers.azureblob.store import MAX_REQUESTS_IN_FLIGHT, ByteBudget, azure_blob_store
from testsupport.azurite import Azurite, azure_config

pytestmark = pytest.mark.anyio
KiB, MiB = 1024, 1024 * 1024


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
    in_flight = peak = 0

    def counted(method):
        async def wrapper(*args, **kwargs):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await asyncio.sleep(0.05)  # hold the request open so that overlaps are observable
                return await method(*args, **kwargs)
            finally:
                in_flight -= 1
        return wrapper

    monkeypatch.setattr(BlobClient, "stage_block", counted(BlobClient.stage_block))
    monkeypatch.setattr(BlobClient, "download_blob", counted(BlobClient.download_blob))
    store = azure_blob_store(azure_config(azurite, chunkbytes=chunk, inflightbytes=32 * MiB))
    data = {name: os.urandom(160 * chunk - 3) for name in ("a", "b")}
    for name, content in data.items():
        (tmp_path / name).write_bytes(content)
    try:
        infos = await asyncio.gather(*(store.upload(tmp_path / name, f"k/{name}") for name in data))
        up, peak = peak, 0
        await asyncio.gather(*(store.download(f"k/{name}", tmp_path / "in" / name, info)
                               for name, info in zip(data, infos)))
    finally:
        await store.close()
    assert all((tmp_path / "in" / name).read_bytes() == content for name, content in data.items())
    # 32 MiB of 64 KiB chunks would allow 512 at once; the count bound allows MAX_REQUESTS_IN_FLIGHT.
    assert 8 < up <= MAX_REQUESTS_IN_FLIGHT and 8 < peak <= MAX_REQUESTS_IN_FLIGHT, (up, peak)
