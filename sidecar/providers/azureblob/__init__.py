"""The Azure Blob store (``--azureblobprovider=true``) on azure-storage-blob's asyncio client, through
adlfs (``store.py``). Credentials: the account key or a connection string, or a Microsoft Entra ID token credential
(``sidecar.dataplane.credentials``), whose child SAS URLs are then user-delegation SAS."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sidecar.providers.azureblob.config import AzureBlobConfig as Config

if TYPE_CHECKING:
    from sidecar.dataplane.blobs import BlobStore


def create(settings: Config, devdir: Path) -> "BlobStore":
    """The blob store for ``settings`` (no connection opened yet)."""
    from sidecar.providers.azureblob.store import azure_blob_store

    return azure_blob_store(settings)
