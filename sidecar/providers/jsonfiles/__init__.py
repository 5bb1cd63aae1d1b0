"""Development DocumentStore: one JSON file per document under ``{devdir}/documents``.

Each write goes to a temp file and is renamed into place, so documents survive process restarts and
concurrent writers (two sidecars, one after the other or at once) never corrupt one another. The files
are small; reading and writing them inline is cheaper than a thread hop.
"""

from __future__ import annotations

import json
from pathlib import Path

from sidecar.dataplane.documents import STORE, R, parse_record
from sidecar.errors import DataPlaneError
from sidecar.layout import json_problem, write_json_atomic
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

    def _read(self, model: type[R], kind: str, doc_id: str) -> R | None:
        """The ``model`` record stored as ``kind``/``doc_id``, or None; a file that is not one (not
        UTF-8, not JSON, not the record) is refused as the MongoDB provider refuses such a document.

        Raises:
            DataPlaneError: naming the document and what is wrong with it (HTTP 502).
        """
        where = f"{'event meta' if kind == 'eventmeta' else kind} '{doc_id}' in {self.root}"
        try:
            raw = self._file(kind, doc_id).read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataPlaneError(STORE, f"{where} is not a valid record: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        except ValueError as exc:
            raise DataPlaneError(STORE, f"{where} is not a valid record: malformed JSON: {json_problem(exc)}") from None
        except RecursionError:
            raise DataPlaneError(STORE, f"{where} is not a valid record: malformed JSON: nested too deeply") from None
        return parse_record(model, doc, where)

    async def get_event_meta(self, event_id: str) -> EventMeta | None:
        return self._read(EventMeta, "eventmeta", event_id)

    async def upsert_event_metas(self, metas: list[EventMeta]) -> None:
        for meta in metas:
            write_json_atomic(self._file("eventmeta", meta.id), meta.model_dump(mode="json"))

    async def upsert_insight(self, insight: Insight) -> None:
        write_json_atomic(self._file("insight", insight.id), insight.model_dump(mode="json"))

    async def get_insight(self, execution_id: str) -> Insight | None:
        return self._read(Insight, "insight", execution_id)

    async def close(self) -> None:
        pass


def create(settings: None, devdir: Path) -> JsonFileDocumentStore:
    """The development document store under ``devdir/documents``."""
    return JsonFileDocumentStore(devdir / "documents")
