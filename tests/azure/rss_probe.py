"""Moves one file of a given size through the Azure provider and reports the process's memory.

``python -m tests.azure.rss_probe BYTES`` (connection string in ``PROBE_CONNECTION_STRING``) uploads a
file of ``BYTES`` (sparse, read back as zeros) with the provider's default chunk size, downloads it
again, and prints one JSON line: ``idle`` (RSS after a warm-up transfer) and ``peak`` (the process's
high-water RSS after the transfers), both in bytes. ``peak - idle`` over-estimates the rise, never under-estimates it.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import psutil

from sidecar.config import AzureBlobConfig
from sidecar.dataplane.azure import azure_blob_store


async def probe(connection_string: str, size: int) -> dict[str, int]:
    cfg = AzureBlobConfig(enabled=True, containername="rssprobe", connectionstring=connection_string)
    store = azure_blob_store(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = root / "warm"
        warm.write_bytes(b"w" * 100_000)
        await store.download("warm", root / "warm.in", await store.upload(warm, "warm"))
        big = root / "big"
        with open(big, "wb") as f:
            f.truncate(size)
        idle = psutil.Process().memory_info().rss
        info = await store.upload(big, "big")
        got = await store.download("big", root / "big.in", info)
        assert info.size == got.size == size == (root / "big.in").stat().st_size
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    await store.close()
    return {"idle": idle, "peak": peak}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(probe(os.environ["PROBE_CONNECTION_STRING"], int(sys.argv[1])))))
