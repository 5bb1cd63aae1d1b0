"""Development EventPublisher: each published event as ``{devdir}/events/{eventId}.json``."""

from __future__ import annotations

from pathlib import Path

from sidecar.dataplane.events import Deadline, OnPublished
from sidecar.layout import write_json_atomic
from sidecar.models import Event
from sidecar.paths import id_segment


class FileEventPublisher:
    """EventPublisher (``sidecar.dataplane.events``): one JSON file per event in ``root``, named by
    event id (:func:`~sidecar.paths.id_segment`); re-publishing overwrites the same file."""

    deadline: Deadline | None = None

    def __init__(self, root: Path):
        self.root = root

    def file(self, event_id: str) -> Path:
        """Where the event ``event_id`` is written."""
        return self.root / f"{id_segment(event_id)}.json"

    def describe(self) -> str:
        return f"files under {self.root}"

    def destination(self, event: Event) -> str:
        return f"folder {self.root}"

    async def publish(self, events: list[Event], on_published: OnPublished | None = None,
                      on_sending: OnPublished | None = None) -> None:
        # No on_sending: a file is written or not, and writing it again is harmless.
        for event in events:
            write_json_atomic(self.file(event.id), event.model_dump(mode="json"))
        if on_published is not None:  # one batch: re-writing a file is harmless, so no need to fsync per event
            on_published([event.id for event in events])

    async def check_topics(self, event_types: list[str]) -> bool | None:
        """Files have no duplicates to detect: nothing to check."""
        return None

    async def close(self) -> None:
        pass


def create(settings: None, devdir: Path) -> FileEventPublisher:
    """The development event publisher writing to ``devdir/events``."""
    return FileEventPublisher(devdir / "events")
