"""The MongoDB document store (``--mongodbdocprovider=true``): self-hosted MongoDB, or Cosmos DB's API
for MongoDB, on pymongo's asyncio client (``store.py``). Credentials: the password in ``--.password``
or in ``--.uri`` (Cosmos DB for MongoDB takes a connection string, not Microsoft Entra ID tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.providers.mongo.config import MongoConfig as Config

if TYPE_CHECKING:
    from sidecar.providers.mongo.store import MongoDocumentStore


def create(settings: Config, devdir: Path) -> "MongoDocumentStore":
    """The document store for ``settings``; the client is created on first use (no I/O here)."""
    from sidecar.providers.mongo.store import MongoDocumentStore

    return MongoDocumentStore(settings)
