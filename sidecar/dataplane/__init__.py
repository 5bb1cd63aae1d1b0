"""The data plane: one provider per slot (blobs, documents, events), chosen by configuration.

A slot whose real provider is not enabled uses its development provider (``DESIGN.md``: Layout), so
Azure blobs with documents and events kept locally is a valid set-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sidecar.config import SidecarConfig
from sidecar.dataplane.blobs import BlobStore, local_blob_store
from sidecar.dataplane.debug import DebugDumps, NoDumps
from sidecar.dataplane.documents import DocumentStore, JsonFileDocumentStore
from sidecar.dataplane.events import EventPublisher, FileEventPublisher


@dataclass
class DataPlane:
    """The providers one sidecar uses, and where development dumps go."""

    blobs: BlobStore
    documents: DocumentStore
    events: EventPublisher
    dumps: DebugDumps

    async def close(self) -> None:
        """Close every provider's connections."""
        await self.blobs.close()
        self.documents.close()
        await self.events.close()


def build_dataplane(cfg: SidecarConfig) -> DataPlane:
    """Create the providers ``cfg`` selects. Connections open lazily, on first use."""
    devdir = Path(cfg.devdir)
    if cfg.azureblobprovider.enabled:
        from sidecar.dataplane.azure import azure_blob_store

        blobs = azure_blob_store(cfg.azureblobprovider)
    else:
        blobs = local_blob_store(devdir / "blobs")
    if cfg.mongodbdocprovider.enabled:
        from sidecar.dataplane.mongo import MongoDocumentStore

        documents: DocumentStore = MongoDocumentStore(cfg.mongodbdocprovider)
    else:
        documents = JsonFileDocumentStore(devdir / "documents")
    if cfg.servicebuseventprovider.enabled:
        from sidecar.dataplane.servicebus import ServiceBusEventPublisher

        events: EventPublisher = ServiceBusEventPublisher(cfg.servicebuseventprovider)
    else:
        events = FileEventPublisher(devdir / "events")
    dumps = DebugDumps.for_event(devdir, cfg.context.eventid) if cfg.development else NoDumps()
    return DataPlane(blobs, documents, events, dumps)
