"""Hostile inputs beyond the corpus's one-file cases, found by a hostile trial (6), each through the app
against the development providers and the real ones (Azurite, nx-27017, the AMQP 1.0 peer):

- a stored event meta that is not a valid record: the MongoDB provider answered 502 naming it, the
  development one a 500 carrying pydantic's text (and a 500 for a file that is not JSON);
- a tree under ``out/data`` a thousand folders deep: ``/done``'s walk raised RecursionError (a 500), and
  so did every later ``/ready`` on that volume, whose clean-up (``shutil.rmtree``) recurses once per level.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from fastapi.testclient import TestClient

from sidecar.api import create_app
from sidecar.paths import id_segment
from testsupport.hostile import KINDS, Plane, nest, on_own_dataplane, reset_outputs
from testsupport.processes import SECRET

H = {"secret": SECRET}

# Stored event metas that are not EventMeta records: (case, document, the first field named).
NOT_RECORDS = [
    ("files-not-a-list", {"files": "a.txt"}, "('files',)"),
    ("path-not-a-string", {"files": [{"path": 5, "key": "p/m/a", "size": 1}]}, "('files', 0, 'path')"),
    ("size-not-a-number", {"files": [{"path": "a", "key": "p/m/a", "size": "x"}]}, "('files', 0, 'size')"),
    ("value-not-a-string", {"data": [{"key": "k", "value": 5}]}, "('data', 0, 'value')"),
    ("pair-with-extra-field", {"data": [{"key": "k", "value": "v", "x": 1}]}, "('data', 0, 'x')"),
    ("no-event-type", {"eventType": None}, "('eventType',)"),
]
# What only a file can hold (development mode): bytes that are not a document at all.
NOT_DOCUMENTS = [
    ("not-json", b"{not json", "malformed JSON"),
    ("number-too-long", b'{"id": ' + b"1" * 5000 + b"}", "a number too long to read"),
    ("not-utf8", b'{"id": "caf\xe9"}', "not UTF-8"),
    ("nested-too-deeply", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
]


def meta_doc(event_id: str, **fields: object) -> dict:
    doc = {"id": event_id, "eventId": event_id, "correlationId": "corr-hostile", "parentEventId": "someone",
           "eventType": "file_discovered", "producer": "someone", "files": [], "data": []}
    doc.update(fields)
    return {k: v for k, v in doc.items() if v is not None}


def store_raw(plane: Plane, runtime, event_id: str, doc: dict | bytes) -> None:
    """Store ``doc`` as the event meta of ``event_id`` as it is, past the sidecar's model: a file of the
    development document store, or a document written with pymongo."""
    if plane.stack is None:
        path = plane.root / ".dev" / "documents" / "eventmeta" / f"{id_segment(event_id)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
        return

    async def put(dataplane) -> None:
        metas = dataplane.documents.open()[0]
        await metas.replace_one({"_id": event_id}, {"_id": event_id, **doc}, upsert=True)

    on_own_dataplane(runtime, put)


@pytest.mark.parametrize("plane", KINDS, indirect=True)
def test_a_stored_event_meta_that_is_not_a_record_is_refused_alike(plane: Plane) -> None:
    """502 naming the event meta and its first wrong field, in development mode as with MongoDB (before:
    a 500 ``internal error: ValidationError: ...`` in development mode), and nothing staged."""
    cases = [(case, meta_doc("", **fields), field) for case, fields, field in NOT_RECORDS]
    if plane.stack is None:
        cases += NOT_DOCUMENTS
    for case, doc, detail in cases:
        event_id = f"hostile-record-{case}"
        runtime = plane.runtime(event_id, "child", parent="someone")
        if isinstance(doc, dict):
            doc = {**doc, "id": event_id, "eventId": event_id}
        store_raw(plane, runtime, event_id, doc)
        with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
            answer = client.get("/ready", headers=H)
        body = answer.json()
        assert answer.status_code == 502, (case, body)
        assert body["message"].startswith(f"document store error: event meta '{event_id}' in "), (case, body)
        assert "is not a valid record: " in body["message"] and detail in body["message"], (case, body)
        assert not any(runtime.layout.in_data.iterdir()) and not runtime.layout.in_meta.exists(), case
        shutil.rmtree(plane.root / "child")


@pytest.mark.parametrize("plane", KINDS, indirect=True)
def test_a_tree_too_deep_to_walk_is_refused_and_the_next_run_still_starts(plane: Plane) -> None:
    """/done answers 400 naming the folder where names get too long, commits nothing; a fresh run on the
    same volume empties it on /ready (before: RecursionError, a 500, on both, for good)."""
    runtime = plane.runtime("hostile-deep")
    out = runtime.layout.basedir / "out"
    try:
        with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
            assert client.get("/ready", headers=H).status_code == 200
            reset_outputs(out)
            nest(out / "data", ["d"] * 1100)
            before = plane.committed("hostile-deep")
            answer = client.get("/done", headers=H)
            body = answer.json()
            assert answer.status_code == 400, body
            assert body["message"].startswith("out/data/" + "d/" * 253 + "d: is a folder no file below which can be "
                                               "committed: a name below it has 255 path segments"), body
            assert plane.committed("hostile-deep") == before
        # The module stops there; the next run on this volume (another event) starts from an empty out/.
        rerun = plane.runtime("hostile-deep-next")
        with TestClient(create_app(rerun), raise_server_exceptions=False) as client:
            answer = client.get("/ready", headers=H)
            assert answer.status_code == 200, answer.text
        assert sorted(os.listdir(out)) == ["data", "events"] and not os.listdir(out / "data")
    finally:  # pytest's own clean-up recurses once per level too
        subprocess.run(["rm", "-rf", str(out)], check=True)
