"""The conformance matrix: every provider of every building block, one line each.

Each suite (``test_blobs*``, ``test_documents*``, ``test_events*``) runs unchanged against every
provider of its building block, the development providers and the real ones on their local peers
(Azurite, nx-27017, the AMQP 1.0 peer), the way Dapr runs one conformance suite per building block
against every component. A provider is built by the sidecar's own factory from the seed's flags
(``testsupport.providers``). Adding a provider: its class in ``testsupport/providers.py`` and one line
here. The error-contract suites run against the providers that talk to a service (``service`` set).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from testsupport.providers import (AzureBlobs, DocumentSubject, EventSubject, FileEvents, JsonFileDocuments,
                                   LocalBlobs, MongoDocuments, Provider, ServiceBusEvents, Subject)

BLOB_PROVIDERS: list[Provider] = [
    LocalBlobs(),
    AzureBlobs(),
]
DOCUMENT_PROVIDERS: list[Provider] = [
    JsonFileDocuments(),
    MongoDocuments(),
]
EVENT_PROVIDERS: list[Provider] = [
    FileEvents(),
    ServiceBusEvents(per_type=False),
    ServiceBusEvents(per_type=True),
]


def _subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    provider: Provider = request.param
    service = request.getfixturevalue(provider.service) if provider.service else None
    subject = provider.open(service, tmp_path)
    try:
        yield subject
    finally:
        subject.close()


def _remote(providers: list[Provider]) -> list[Provider]:
    return [p for p in providers if p.service]


@pytest.fixture(params=BLOB_PROVIDERS, ids=repr)
def blob_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    yield from _subject(request, tmp_path)


@pytest.fixture(params=_remote(BLOB_PROVIDERS), ids=repr)
def remote_blob_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Subject]:
    yield from _subject(request, tmp_path)


@pytest.fixture(params=DOCUMENT_PROVIDERS, ids=repr)
def document_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DocumentSubject]:
    yield from _subject(request, tmp_path)  # type: ignore[misc]


@pytest.fixture(params=_remote(DOCUMENT_PROVIDERS), ids=repr)
def remote_document_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DocumentSubject]:
    yield from _subject(request, tmp_path)  # type: ignore[misc]


@pytest.fixture(params=EVENT_PROVIDERS, ids=repr)
def event_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventSubject]:
    yield from _subject(request, tmp_path)  # type: ignore[misc]


@pytest.fixture(params=_remote(EVENT_PROVIDERS), ids=repr)
def remote_event_subject(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EventSubject]:
    yield from _subject(request, tmp_path)  # type: ignore[misc]
