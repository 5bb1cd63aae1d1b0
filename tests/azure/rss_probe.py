"""Moves large files at once through the Azure provider and reports the process's memory.

``python -m tests.azure.rss_probe FILES BYTES [INFLIGHTBYTES]`` (connection string in
``PROBE_CONNECTION_STRING``) uploads ``FILES`` files of ``BYTES`` each (sparse, read back as zeros) at
once with the provider's and the transfers' default settings (or that in-flight-bytes budget), downloads them again at once, and prints one JSON line: ``idle`` (RSS
after a warm-up transfer), ``peak`` (the process's high-water RSS after the transfers), both in bytes,
and ``budget`` (the provider's in-flight-bytes budget). ``peak - idle`` over-estimates the rise, never
under-estimates it.
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

from sidecar.config import TransferConfig
from sidecar.providers.azureblob.config import AzureBlobConfig
from sidecar.providers.azureblob.store import azure_blob_store
from sidecar.dataplane.blobs import gather_bounded


async def probe(connection_string: str, files: int, size: int, inflightbytes: int | None = None) -> dict[str, int]:
    cfg = AzureBlobConfig(enabled=True, containername="rssprobe", connectionstring=connection_string)
    if inflightbytes is not None:
        cfg.inflightbytes = inflightbytes
    store = azure_blob_store(cfg)
    limit = asyncio.Semaphore(TransferConfig().concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        warm = root / "warm"
        warm.write_bytes(b"w" * 100_000)
        await store.download("warm", root / "warm.in", await store.upload(warm, "warm"))
        names = [f"big{i}" for i in range(files)]
        for name in names:
            with open(root / name, "wb") as f:
                f.truncate(size)
        idle = psutil.Process().memory_info().rss
        infos = await gather_bounded(limit, [store.upload(root / name, name) for name in names])
        got = await gather_bounded(limit, [store.download(n, root / f"{n}.in", i) for n, i in zip(names, infos)])
        assert all(a.size == b.size == size == (root / f"{n}.in").stat().st_size
                   for n, a, b in zip(names, infos, got))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    await store.close()
    return {"idle": idle, "peak": peak, "budget": cfg.inflightbytes}


if __name__ == "__main__":
    count, nbytes = int(sys.argv[1]), int(sys.argv[2])
    budget = int(sys.argv[3]) if len(sys.argv) > 3 else None
    print(json.dumps(asyncio.run(probe(os.environ["PROBE_CONNECTION_STRING"], count, nbytes, budget))))
