"""The data plane: one provider per building block (blob store, document store, event publisher).

The interfaces are ``blobs.BlobStore``, ``documents.DocumentStore`` and ``events.EventPublisher``; the
providers live in ``sidecar.providers`` and are chosen by configuration through ``registry``. A block
whose real provider is not enabled uses its development provider (``DESIGN.md``: Layout), so Azure
blobs with documents and events kept locally is a valid set-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sidecar.config import SidecarConfig
    from sidecar.dataplane.blobs import BlobStore
    from sidecar.dataplane.debug import DebugDumps
    from sidecar.dataplane.documents import DocumentStore
    from sidecar.dataplane.events import EventPublisher


@dataclass
class DataPlane:
    """The providers one sidecar uses, and where development dumps go."""

    blobs: "BlobStore"
    documents: "DocumentStore"
    events: "EventPublisher"
    dumps: "DebugDumps"

    async def close(self) -> None:
        """Close every provider's connections, each one even when closing another failed (an error is
        raised once all were tried, chained to any earlier one)."""
        try:
            await self.blobs.close()
        finally:
            try:
                await self.documents.close()
            finally:
                await self.events.close()


def build_dataplane(cfg: "SidecarConfig") -> DataPlane:
    """Create the providers ``cfg`` selects (``registry.create``). Connections open lazily, on first use."""
    from sidecar.dataplane import registry
    from sidecar.dataplane.debug import DebugDumps, NoDumps

    devdir = Path(cfg.devdir)
    dumps = DebugDumps.for_run(devdir, cfg.context.eventid, cfg.context.name) if cfg.development else NoDumps()
    return DataPlane(
        blobs=registry.create(cfg, registry.BLOBS, devdir),
        documents=registry.create(cfg, registry.DOCUMENTS, devdir),
        events=registry.create(cfg, registry.EVENTS, devdir),
        dumps=dumps,
    )
