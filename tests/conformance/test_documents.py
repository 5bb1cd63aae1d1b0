"""Document store conformance: the behaviour every document provider keeps (``conftest.DOCUMENT_PROVIDERS``).

Event metas are keyed by the child event id, insights by the execution id (``DESIGN.md``: Data plane
records): a missing document is None, every write is an idempotent upsert leaving one copy, the two
kinds live apart, another sidecar sees what one wrote, and concurrent writers never duplicate.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from sidecar.dataplane.documents import DocumentStore
from testsupport.providers import DocumentSubject, insight, meta

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(document_subject: DocumentSubject) -> AsyncIterator[DocumentStore]:
    dataplane = document_subject.dataplane()
    try:
        yield dataplane.documents
    finally:
        await dataplane.close()


async def test_not_found_is_none(store: DocumentStore) -> None:
    assert await store.get_event_meta("no-such-event") is None
    assert await store.get_insight("no-such-execution") is None


async def test_round_trip_through_another_sidecar(store: DocumentStore, document_subject: DocumentSubject) -> None:
    metas = [meta("evt-a"), meta("evt-b", files=0), meta("evt with spaces.and$dots", label="ü")]
    await store.upsert_event_metas(metas)
    await store.upsert_insight(insight("exec-1"))
    other = document_subject.dataplane()  # another process sees the same documents
    try:
        for m in metas:
            assert await other.documents.get_event_meta(m.id) == m
        assert await other.documents.get_insight("exec-1") == insight("exec-1")
    finally:
        await other.close()


async def test_empty_upsert_is_a_no_op(store: DocumentStore) -> None:
    await store.upsert_event_metas([])
    assert await store.get_event_meta("evt-a") is None


async def test_upserts_are_idempotent(store: DocumentStore, document_subject: DocumentSubject) -> None:
    # A retried /done writes the same documents again, possibly changed: one copy, the last one.
    await store.upsert_event_metas([meta("evt-a"), meta("evt-b")])
    await store.upsert_event_metas([meta("evt-a", label="v2"), meta("evt-b")])
    await store.upsert_insight(insight("exec-1"))
    await store.upsert_insight(insight("exec-1", label="v2"))
    assert await store.get_event_meta("evt-a") == meta("evt-a", label="v2")
    assert await store.get_insight("exec-1") == insight("exec-1", label="v2")
    assert [document_subject.copies("eventmeta", i) for i in ("evt-a", "evt-b")] == [1, 1]
    assert document_subject.copies("insight", "exec-1") == 1


async def test_metas_and_insights_are_apart(store: DocumentStore, document_subject: DocumentSubject) -> None:
    await store.upsert_event_metas([meta("same-id")])
    await store.upsert_insight(insight("same-id"))
    assert await store.get_event_meta("same-id") == meta("same-id")
    assert await store.get_insight("same-id") == insight("same-id")
    await store.upsert_insight(insight("only-insight"))
    assert await store.get_event_meta("only-insight") is None
    assert document_subject.copies("eventmeta", "same-id") == 1 and document_subject.copies("insight", "same-id") == 1


async def test_concurrent_writers(document_subject: DocumentSubject) -> None:
    # Several sidecars (one store each) upserting the same and their own documents at once.
    writers = 6
    dataplanes = [document_subject.dataplane() for _ in range(writers)]

    async def write(n: int) -> None:
        for round_ in range(3):
            await dataplanes[n].documents.upsert_event_metas(
                [meta("shared-1", label=f"w{n}"), meta("shared-2", label=f"w{n}"), meta(f"own-{n}")])
            await dataplanes[n].documents.upsert_insight(insight("shared-exec", label=f"w{n}r{round_}"))

    try:
        await asyncio.gather(*(write(n) for n in range(writers)))
        reader = dataplanes[0].documents
        for shared in ("shared-1", "shared-2"):
            got = await reader.get_event_meta(shared)
            assert got is not None and got.data[0].value in {f"w{n}" for n in range(writers)}
            assert document_subject.copies("eventmeta", shared) == 1
        for n in range(writers):
            assert await reader.get_event_meta(f"own-{n}") == meta(f"own-{n}")
            assert document_subject.copies("eventmeta", f"own-{n}") == 1
        assert await reader.get_insight("shared-exec") is not None
        assert document_subject.copies("insight", "shared-exec") == 1
    finally:
        for dataplane in dataplanes:
            await dataplane.close()
