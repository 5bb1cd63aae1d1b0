"""Document store timings, side by side in one run: the development JSON-file store against MongoDB
(nx-27017, a MongoDB wire-protocol server over SQLite, on loopback), and how long a call takes to
fail with the server down relative to the configured server-selection timeout.

Run: ``.venv/bin/python bench/documents.py [count]`` (after ``scripts/setup test``). Prints ratios;
absolute figures depend on the machine and, for MongoDB, on the server (nx-27017 is not MongoDB).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.dataplane.documents import DocumentStore  # noqa: E402
from sidecar.providers.jsonfiles import JsonFileDocumentStore  # noqa: E402
from sidecar.providers.mongo.store import MongoDocumentStore  # noqa: E402
from sidecar.errors import DataPlaneUnavailable  # noqa: E402
from sidecar.models import BlobFile, EventMeta, KeyValuePair  # noqa: E402
from testsupport.mongo import NxServer  # noqa: E402


def metas(count: int) -> list[EventMeta]:
    return [EventMeta(id=f"evt-{i}", eventId=f"evt-{i}", correlationId="corr", parentEventId="parent",
                      eventType="file_discovered", producer="bench",
                      files=[BlobFile(path=f"f{i}.txt", key=f"parent/bench/f{i}.txt", size=i)],
                      data=[KeyValuePair(key="index", value=str(i))]) for i in range(count)]


async def timed(action: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await action()
    return time.perf_counter() - started


async def measure(store: DocumentStore, docs: list[EventMeta]) -> dict[str, float]:
    async def get_each() -> None:
        for m in docs:
            await store.get_event_meta(m.id)

    return {
        "upsert (one bulk call)": await timed(lambda: store.upsert_event_metas(docs)),
        "upsert again (all replaced)": await timed(lambda: store.upsert_event_metas(docs)),
        "get each": await timed(get_each),
    }


def main() -> None:
    asyncio.run(run())


async def run() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    docs = metas(count)
    with tempfile.TemporaryDirectory() as tmp:
        server = NxServer(Path(tmp))
        server.start()
        try:
            json_store = JsonFileDocumentStore(Path(tmp) / "documents")
            mongo_store = MongoDocumentStore(server.config("bench"))
            await mongo_store.get_event_meta("warm-up")  # connect once, as a running sidecar would have
            local, mongo = await measure(json_store, docs), await measure(mongo_store, docs)
            print(f"{count} event metas: seconds (JSON files | MongoDB via nx-27017 | MongoDB/JSON)")
            for name in local:
                print(f"  {name:28} {local[name]:8.3f} | {mongo[name]:8.3f} | {mongo[name] / local[name]:6.1f}x")
            await mongo_store.close()

            server.stop()
            for timeout in (0.5, 2.0):
                down = MongoDocumentStore(server.config("bench", serverselectiontimeoutseconds=timeout))
                try:
                    started = time.perf_counter()
                    await down.get_event_meta("evt-0")
                except DataPlaneUnavailable:
                    took = time.perf_counter() - started
                    print(f"server down, serverselectiontimeoutseconds={timeout}: DataPlaneUnavailable after "
                          f"{took:.2f}s ({took / timeout:.2f}x the timeout)")
                finally:
                    await down.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
