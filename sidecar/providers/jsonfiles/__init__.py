"""Development DocumentStore: one JSON file per document under ``{devdir}/documents``.

Each write goes to a temp file and is renamed into place, so documents survive process restarts and
concurrent writers (two sidecars, one after the other or at once) never corrupt one another. The files
are small; reading and writing them inline is cheaper than a thread hop.
"""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.layout import write_json_atomic
from sidecar.models import EventMeta, Insight
from sidecar.paths import id_segment


class JsonFileDocumentStore:
    """DocumentStore (``sidecar.dataplane.documents``) of one JSON file per document below ``root``:
    ``root/eventmeta/{id}.json`` and ``root/insight/{id}.json`` (ids as :func:`~sidecar.paths.id_segment`)."""

    def __init__(self, root: Path):
        self.root = root

    def describe(self) -> str:
        return f"JSON files under {self.root}"

    def _file(self, kind: str, doc_id: str) -> Path:
        return self.root / kind / f"{id_segment(doc_id)}.json"

    def _read(self, kind: str, doc_id: str) -> dict | None:
        try:
            return json.loads(self._file(kind, doc_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    async def get_event_meta(self, event_id: str) -> EventMeta | None:
        doc = self._read("eventmeta", event_id)
        return EventMeta.model_validate(doc) if doc is not None else None

    async def upsert_event_metas(self, metas: list[EventMeta]) -> None:
        for meta in metas:
            write_json_atomic(self._file("eventmeta", meta.id), meta.model_dump(mode="json"))

    async def upsert_insight(self, insight: Insight) -> None:
        write_json_atomic(self._file("insight", insight.id), insight.model_dump(mode="json"))

    async def get_insight(self, execution_id: str) -> Insight | None:
        doc = self._read("insight", execution_id)
        return Insight.model_validate(doc) if doc is not None else None

    async def close(self) -> None:
        pass


def create(settings: None, devdir: Path) -> JsonFileDocumentStore:
    """The development document store under ``devdir/documents``."""
    return JsonFileDocumentStore(devdir / "documents")
