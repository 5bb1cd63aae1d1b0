"""EventPublisher: the event slot of the data plane.

Development mode writes each published event as ``{devdir}/events/{eventId}.json``; the Azure Service
Bus provider lives in ``sidecar.dataplane.servicebus``. Publishing the same event twice (same id) must
be harmless on every provider: the file is overwritten, Service Bus drops the duplicate message id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol
from urllib.parse import quote

from sidecar.layout import write_json_atomic
from sidecar.models import Event

STORE = "event bus"

# Called with the ids of each batch of events right after the event bus accepted it.
OnPublished = Callable[[list[str]], None]


class EventPublisher(Protocol):
    """Publishes child events.

    Errors: a bus that cannot be reached in time raises :class:`~sidecar.errors.DataPlaneUnavailable`
    (``store="event bus"``); a refused publish raises :class:`~sidecar.errors.DataPlaneError`.
    """

    async def publish(self, events: list[Event], on_published: OnPublished | None = None) -> None:
        """Publish ``events`` (all or, on error, possibly some of them; retrying is safe), calling
        ``on_published(ids)`` after each batch the bus accepted."""

    def destination(self, event: Event) -> str:
        """Where ``event`` goes, for people reading the run history (e.g. ``topic 'x'``)."""

    async def close(self) -> None:
        """Release connections."""


class FileEventPublisher:
    """Development EventPublisher: one JSON file per event in ``root``, named by event id."""

    def __init__(self, root: Path):
        self.root = root

    def file(self, event_id: str) -> Path:
        """Where the event ``event_id`` is written."""
        return self.root / f"{quote(event_id, safe='')}.json"

    def destination(self, event: Event) -> str:
        return f"folder {self.root}"

    async def publish(self, events: list[Event], on_published: OnPublished | None = None) -> None:
        for event in events:
            write_json_atomic(self.file(event.id), event.model_dump(mode="json"))
        if on_published is not None:  # one batch: re-writing a file is harmless, so no need to fsync per event
            on_published([event.id for event in events])

    async def close(self) -> None:
        pass
