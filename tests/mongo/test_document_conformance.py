"""DocumentStore conformance: the same tests, unchanged, against every provider of the document slot
(the development JSON-file store and MongoDB over a real wire connection), the way Dapr tests its
components (``DESIGN.md``: Layout)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from sidecar.dataplane.documents import DocumentStore
from sidecar.providers.jsonfiles import JsonFileDocumentStore
from sidecar.providers.mongo.store import INSIGHTS_SUFFIX, MongoDocumentStore
from sidecar.models import BlobFile, EventMeta, Insight, KeyValuePair
from testsupport.blocking import Blocking
from testsupport.mongo import collection_name


@dataclass
class Backend:
    """One provider under test: ``make()`` opens another store on the same storage (another sidecar),
    (each as :class:`~testsupport.blocking.Blocking`), ``copies(kind, id)`` counts the stored documents
    whose ``id`` is ``id`` (kind: eventmeta/insight)."""

    make: Callable[[], DocumentStore]
    copies: Callable[[str, str], int]


def _json_backend(root: Path) -> Backend:
    def copies(kind: str, doc_id: str) -> int:
        return sum(json.loads(p.read_text())["id"] == doc_id for p in (root / kind).glob("*.json"))

    return Backend(lambda: Blocking(JsonFileDocumentStore(root)), copies)


def _mongo_backend(server) -> Backend:
    cfg = server.config(collection_name("conf"))
    names = {"eventmeta": cfg.collection, "insight": cfg.collection + INSIGHTS_SUFFIX}

    def copies(kind: str, doc_id: str) -> int:
        with server.client() as client:
            return len(list(client["ion"][names[kind]].find({"id": doc_id})))

    return Backend(lambda: Blocking(MongoDocumentStore(cfg)), copies)


@pytest.fixture(params=["json", "mongo"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "json":
        yield _json_backend(tmp_path / "documents")
    else:
        yield _mongo_backend(request.getfixturevalue("mongo_server"))


@pytest.fixture
def store(backend: Backend):
    opened = backend.make()
    yield opened
    opened.close()


def meta(event_id: str, *, label: str = "v1", files: int = 2) -> EventMeta:
    return EventMeta(
        id=event_id, eventId=event_id, correlationId="corr-ü", parentEventId="evt-parent",
        eventType="file_discovered", producer="parent",
        files=[BlobFile(path=f"found/f{i}.txt", key=f"evt-parent/parent/found/f{i}.txt", size=10 * i,
                        md5="0" * 32 if i else None, url=None) for i in range(files)],
        data=[KeyValuePair(key="label", value=label), KeyValuePair(key="quote", value='"$x.y": {}')],
    )


def insight(execution_id: str, *, label: str = "v1") -> Insight:
    return Insight(id=execution_id, executionId=execution_id, eventId="evt-1", correlationId="corr-1",
                   parentEventId="", name="module", data=[KeyValuePair(key="label", value=label)])


def test_not_found_is_none(store: DocumentStore) -> None:
    assert store.get_event_meta("no-such-event") is None
    assert store.get_insight("no-such-execution") is None


def test_round_trip(store: DocumentStore, backend: Backend) -> None:
    metas = [meta("evt-a"), meta("evt-b", files=0), meta("evt/with spaces.and$dots", label="ü")]
    store.upsert_event_metas(metas)
    store.upsert_insight(insight("exec-1"))
    other = backend.make()  # another process sees the same documents
    try:
        for m in metas:
            assert other.get_event_meta(m.id) == m
        assert other.get_insight("exec-1") == insight("exec-1")
    finally:
        other.close()


def test_empty_upsert_is_a_no_op(store: DocumentStore) -> None:
    store.upsert_event_metas([])
    assert store.get_event_meta("evt-a") is None


def test_upserts_are_idempotent(store: DocumentStore, backend: Backend) -> None:
    # A retried /done writes the same documents again, possibly changed: one copy, the last one.
    store.upsert_event_metas([meta("evt-a"), meta("evt-b")])
    store.upsert_event_metas([meta("evt-a", label="v2"), meta("evt-b")])
    store.upsert_insight(insight("exec-1"))
    store.upsert_insight(insight("exec-1", label="v2"))
    assert store.get_event_meta("evt-a") == meta("evt-a", label="v2")
    assert store.get_insight("exec-1") == insight("exec-1", label="v2")
    assert [backend.copies("eventmeta", i) for i in ("evt-a", "evt-b")] == [1, 1]
    assert backend.copies("insight", "exec-1") == 1


def test_metas_and_insights_are_apart(store: DocumentStore, backend: Backend) -> None:
    store.upsert_event_metas([meta("same-id")])
    store.upsert_insight(insight("same-id"))
    assert store.get_event_meta("same-id") == meta("same-id")
    assert store.get_insight("same-id") == insight("same-id")
    store.upsert_insight(insight("only-insight"))
    assert store.get_event_meta("only-insight") is None
    assert backend.copies("eventmeta", "same-id") == 1 and backend.copies("insight", "same-id") == 1


def test_concurrent_writers(backend: Backend) -> None:
    # Several sidecars (one store each) upserting the same and their own documents at once.
    writers = 6
    stores = [backend.make() for _ in range(writers)]

    def write(n: int) -> None:
        for round_ in range(3):
            stores[n].upsert_event_metas([meta("shared-1", label=f"w{n}"), meta("shared-2", label=f"w{n}"), meta(f"own-{n}")])
            stores[n].upsert_insight(insight("shared-exec", label=f"w{n}r{round_}"))

    try:
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(write, range(writers)))
        reader = stores[0]
        for shared in ("shared-1", "shared-2"):
            got = reader.get_event_meta(shared)
            assert got is not None and got.data[0].value in {f"w{n}" for n in range(writers)}
            assert backend.copies("eventmeta", shared) == 1
        for n in range(writers):
            assert reader.get_event_meta(f"own-{n}") == meta(f"own-{n}")
            assert backend.copies("eventmeta", f"own-{n}") == 1
        assert reader.get_insight("shared-exec") is not None and backend.copies("insight", "shared-exec") == 1
    finally:
        for s in stores:
            s.close()
