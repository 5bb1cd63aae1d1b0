"""DocumentStore: the document slot of the data plane (event metas and insights).

Event metas are keyed by the child event id, insights by the execution id (``DESIGN.md``: Data plane
records), so every write is an idempotent upsert. Development mode keeps each document as a JSON file
under ``{devdir}/documents``; the MongoDB provider lives in ``sidecar.dataplane.mongo``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from sidecar.layout import write_json_atomic
from sidecar.models import EventMeta, Insight

STORE = "document store"


class DocumentStore(Protocol):
    """Stores event metas and insights. Every method is synchronous and may block on I/O.

    Errors: a service that cannot be reached raises :class:`~sidecar.errors.DataPlaneUnavailable`
    (``store="document store"``); a refused request raises :class:`~sidecar.errors.DataPlaneError`.
    """

    def get_event_meta(self, event_id: str) -> EventMeta | None:
        """The event meta stored for ``event_id``, or None when there is none (first module)."""

    def upsert_event_metas(self, metas: list[EventMeta]) -> None:
        """Store each meta under its ``id``, replacing any earlier copy."""

    def upsert_insight(self, insight: Insight) -> None:
        """Store the insight under its ``id`` (the execution id), replacing any earlier copy."""

    def get_insight(self, execution_id: str) -> Insight | None:
        """The insight stored for ``execution_id``, or None."""

    def close(self) -> None:
        """Release connections."""


class JsonFileDocumentStore:
    """Development DocumentStore: one JSON file per document below ``root``.

    Each write goes to a temp file and is renamed into place, so documents survive process restarts
    and concurrent writers (two sidecars, one after the other or at once) never corrupt one another.
    """

    def __init__(self, root: Path):
        self.root = root

    def _file(self, kind: str, doc_id: str) -> Path:
        return self.root / kind / f"{quote(doc_id, safe='')}.json"

    def _read(self, kind: str, doc_id: str) -> dict | None:
        try:
            return json.loads(self._file(kind, doc_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def get_event_meta(self, event_id: str) -> EventMeta | None:
        doc = self._read("eventmeta", event_id)
        return EventMeta.model_validate(doc) if doc is not None else None

    def upsert_event_metas(self, metas: list[EventMeta]) -> None:
        for meta in metas:
            write_json_atomic(self._file("eventmeta", meta.id), meta.model_dump(mode="json"))

    def upsert_insight(self, insight: Insight) -> None:
        write_json_atomic(self._file("insight", insight.id), insight.model_dump(mode="json"))

    def get_insight(self, execution_id: str) -> Insight | None:
        doc = self._read("insight", execution_id)
        return Insight.model_validate(doc) if doc is not None else None

    def close(self) -> None:
        pass
