"""End to end with the MongoDB document provider: real sidecar processes, a real module process and a
real MongoDB wire-protocol server (nx-27017). Blobs and events stay on the development providers,
which is a valid set-up (``DESIGN.md``: Layout)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from flows.runtime import child_event_id
from ion_sidecar_client import SidecarClient
from sidecar.config import ContextConfig, SidecarConfig
from sidecar.providers.mongo.store import INSIGHTS_SUFFIX
from testsupport.mongo import NxServer, collection_name
from testsupport.processes import SidecarProcess, dev_args, run_child_of_file2, run_module


def mongo_args(server: NxServer, collection: str, event_id: str, correlation_id: str, name: str,
               *, parent: str = "", fast: bool = False) -> list[str]:
    """Seed flags for a sidecar keeping documents in ``collection`` on ``server`` (blobs and events
    local). ``fast``: small server-selection timeout and one quick task retry, for fault tests."""
    args = [a for a in dev_args(event_id, correlation_id, name, parent=parent) if a != "--development=true"]
    args += ["--mongodbdocprovider=true", f"--mongodbdocprovider.uri={server.uri}",
             f"--mongodbdocprovider.collection={collection}"]
    if fast:
        args += ["--mongodbdocprovider.serverselectiontimeoutseconds=0.5", "--transfer.retries=1",
                 "--transfer.retrydelayseconds=0.2"]
    return args


def stored(server: NxServer, collection: str) -> list[dict]:
    """Every document in ``collection`` of the server, as stored."""
    with server.client() as client:
        return list(client["ion"][collection].find({}))


def test_parent_then_child_chain_through_mongodb(tmp_path: Path, mongo_server: NxServer) -> None:
    coll = collection_name("chain")
    with SidecarProcess(tmp_path, mongo_args(mongo_server, coll, "evt-root", "corr-1", "parent")) as parent:
        lines = run_module(parent, EVENT_LABEL="root")
    done = lines[-1]["done"]
    assert done["files"] == 5 and len(done["events"]) == 5
    child_ids = sorted(e["eventId"] for e in done["events"])

    metas = stored(mongo_server, coll)
    assert sorted(m["_id"] for m in metas) == child_ids
    assert all(m["id"] == m["_id"] == m["eventId"] and m["parentEventId"] == "evt-root"
               and m["correlationId"] == "corr-1" for m in metas)
    [insight] = stored(mongo_server, coll + INSIGHTS_SUFFIX)
    assert insight["_id"] == ContextConfig(eventid="evt-root", correlationid="corr-1", name="parent").execution_id()
    assert {p["key"]: p["value"] for p in insight["data"]} == {"files": "5", "inputs": "0"}
    assert not (tmp_path / ".dev" / "documents").exists()  # documents went to MongoDB only

    # The child starts from the event of file2, as Ion's dispatcher would, and finds its meta in MongoDB.
    meta = next(m for m in metas if m["files"][0]["path"] == "found/file2.txt")
    event = json.loads((tmp_path / ".dev" / "events" / f"{meta['_id']}.json").read_text())
    assert event["context"] == {"eventId": meta["_id"], "correlationId": "corr-1", "parentEventId": "evt-root"}
    child_args = mongo_args(mongo_server, coll, meta["_id"], "corr-1", "child", parent="evt-root")
    lines = run_child_of_file2(tmp_path, child_args)
    [grandchild] = lines[-1]["done"]["events"]
    assert len(stored(mongo_server, coll)) == 6 and len(stored(mongo_server, coll + INSIGHTS_SUFFIX)) == 2
    assert next(m for m in stored(mongo_server, coll) if m["_id"] == grandchild["eventId"])["parentEventId"] == meta["_id"]


def test_server_down_during_ready_and_done_then_retry(tmp_path: Path, mongo_server: NxServer) -> None:
    coll = collection_name("fault")
    ctx = ContextConfig(eventid="evt-fault", correlationid="corr-f", name="faulty")
    cfg = SidecarConfig(context=ctx)
    ids = sorted(child_event_id(cfg, f"event{i}.json") for i in range(3))
    # What an earlier, interrupted /done of this run left behind: the insight and one event meta.
    with mongo_server.client() as client:
        client["ion"][coll + INSIGHTS_SUFFIX].insert_one({"_id": ctx.execution_id(), "id": ctx.execution_id(), "stale": True})
        client["ion"][coll].insert_one({"_id": ids[0], "id": ids[0], "stale": True})

    mongo_server.stop()
    with SidecarProcess(tmp_path, mongo_args(mongo_server, coll, ctx.eventid, ctx.correlationid, ctx.name, fast=True)) as sidecar:
        sidecar.wait_healthy()  # start-up does not need the document store
        started = time.perf_counter()
        response = sidecar.get("/ready")
        print(f"/ready with MongoDB down: {response.status_code} after {time.perf_counter() - started:.2f}s")
        assert response.status_code == 503, response.text
        assert response.json()["message"].startswith("document store unavailable: reading event meta 'evt-fault'")

        mongo_server.start()
        assert sidecar.get("/ready").status_code == 200

        module = SidecarClient(sidecar.url, sidecar.secret, sidecar.basedir)
        for i in range(3):
            module.write_file(f"out{i}.txt", f"output {i}\n".encode())
            module.write_event(f"event{i}", "file_discovered", [f"out{i}.txt"], index=str(i))
        module.write_insight(outputs="3")

        mongo_server.stop()
        started = time.perf_counter()
        response = sidecar.get("/done")
        print(f"/done with MongoDB down: {response.status_code} after {time.perf_counter() - started:.2f}s")
        assert response.status_code == 503, response.text
        assert response.json()["message"].startswith("document store unavailable: upserting insight")
        blobs = tmp_path / ".dev" / "blobs" / "evt-fault" / "faulty"
        assert sorted(p.name for p in blobs.iterdir()) == ["out0.txt", "out1.txt", "out2.txt"]  # uploads ran
        events_dir = tmp_path / ".dev" / "events"
        assert not events_dir.exists() or not any(events_dir.iterdir())  # nothing published without metas

        mongo_server.start()  # same port, same data file
        response = sidecar.get("/done")
        assert response.status_code == 200, f"{response.text}\n{sidecar.output()}"
        done = response.json()
        assert sidecar.get("/done").json() == done  # a repeat answers the same, commits nothing again

    assert sorted(e["eventId"] for e in done["events"]) == ids
    metas = stored(mongo_server, coll)
    assert sorted(m["_id"] for m in metas) == ids  # exactly one copy of each, the stale one replaced
    assert all("stale" not in m and m["parentEventId"] == "evt-fault" for m in metas)
    [insight] = stored(mongo_server, coll + INSIGHTS_SUFFIX)
    assert "stale" not in insight and insight["data"] == [{"key": "outputs", "value": "3"}]
    assert sorted(p.stem for p in events_dir.glob("*.json")) == ids  # each event published, once
