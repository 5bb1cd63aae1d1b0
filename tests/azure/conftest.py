"""Fixtures of the blob slot's tests: one Azurite per session, and a BlobStore of each provider.

A missing or broken Azurite fails these tests (the fixture raises); it never skips them.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest

from sidecar.config import AzureBlobConfig
from sidecar.dataplane.azure import azure_blob_store
from sidecar.dataplane.blobs import BlobStore, local_blob_store
from tests.azure.azurite import Azurite, run_azurite

# Small blocks, so that modest test files already take the chunked (Put Block) path.
TEST_CHUNK_BYTES = 64 * 1024


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    with run_azurite() as service:
        yield service


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def azure_config(azurite: Azurite, container: str | None = None, **overrides: object) -> AzureBlobConfig:
    """An enabled Azure provider config on ``azurite`` with a fresh container (unless named)."""
    settings: dict = dict(enabled=True, containername=container or f"c{uuid.uuid4().hex[:20]}",
                          connectionstring=azurite.connection_string(), chunkbytes=TEST_CHUNK_BYTES,
                          connecttimeoutseconds=5.0, readtimeoutseconds=10.0)
    settings.update(overrides)
    return AzureBlobConfig(**settings)


@pytest.fixture(params=["local", "azure"])
async def store(request, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """A BlobStore of each provider: files under tmp_path, or a fresh container in Azurite."""
    if request.param == "local":
        blobs = local_blob_store(tmp_path / "blobs")
    else:
        blobs = azure_blob_store(azure_config(request.getfixturevalue("azurite")))
    try:
        yield blobs
    finally:
        await blobs.close()
