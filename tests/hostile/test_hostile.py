"""The hostile-input corpus (``testsupport/hostile.py``) through the sidecar's app, unchanged against the development
providers and against the real ones (Azurite, nx-27017 and the AMQP 1.0 peer: ``tests/production``'s
stack), with the session's Prefect server.

Each refused case must name the same file and key with the same status in both, commit nothing (no
blob, no document, no message), write nothing outside ``in/data``, and leave no flow run Running. The
accepted odd names and values must arrive byte for byte in a child's ``in/data`` and ``in/meta.json``.
Many cases share one app: a refused ``/done`` or ``/ready`` leaves the run where it was, so the next
case runs on fresh ``out/`` files (or a fresh event meta) in the same process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from flows.runtime import Runtime, blob_key
from sidecar.api import create_app
from sidecar.dataplane.blobs import BlobInfo
from sidecar.models import BlobFile, EventMeta
from sidecar.runstate import RECORD_DIR, RECORD_FILE
from testsupport.hostile import (DONE_CASES, HTTP_DONE, HTTP_READY, KINDS, ODD_NAMES, ODD_VALUES, READY_CASES,
                                  UNLISTABLE_NAMES, Plane, data, event, files_under, link, on_own_dataplane, pairs,
                                  reset_outputs)
from testsupport.processes import SECRET

H = {"secret": SECRET}
# (kind, test, case) -> (status, message): the two kinds must agree.
ANSWERS: dict[str, dict[tuple[str, str], tuple[int, str]]] = {kind: {} for kind in KINDS}


def assert_no_run_left_running(event_id: str) -> None:
    """No flow run of ``event_id`` is still Running (or Pending) once its HTTP call has answered."""
    api = os.environ["PREFECT_API_URL"].rstrip("/")
    runs = httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"name": {"like_": event_id}}}, timeout=30).json()
    assert runs, f"no flow run of {event_id} in the Prefect API"
    stuck = [(r["name"], r["state_type"]) for r in runs if r["state_type"] not in ("COMPLETED", "FAILED")]
    assert not stuck, f"flow runs left unfinished: {stuck}"


@pytest.mark.parametrize("plane", KINDS, indirect=True)
def test_done_refuses_each_hostile_output_and_commits_nothing(plane: Plane) -> None:
    event_id = "hostile-done"
    runtime = plane.runtime(event_id)
    out = runtime.layout.basedir / "out"
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        before = plane.committed(event_id)
        for case in [c for c in DONE_CASES if c.id in HTTP_DONE]:
            reset_outputs(out)
            case.write(out)
            files_before = files_under(plane.root)
            answer = client.get("/done", headers=H)
            body = answer.json()
            ANSWERS[plane.kind][("done", case.id)] = (answer.status_code, body.get("message"))
            assert answer.status_code == 400, (case.id, body)
            assert body["message"].startswith(case.file), (case.id, body["message"])
            assert case.detail in body["message"], (case.id, body["message"])
            assert body["message"].isprintable(), (case.id, body["message"])
            assert plane.committed(event_id) == before, case.id
            assert files_under(plane.root) == files_before, case.id
        # Every refusal left the run at ready: the fixed outputs are committed by the next /done.
        reset_outputs(out)
        good = client.get("/done", headers=H)
        assert good.status_code == 200 and good.json()["files"] == 1, good.text
    assert plane.committed(event_id) != before
    assert_no_run_left_running(event_id)


def grow(d: Path) -> None:
    with open(d / "a.bin", "ab") as f:
        f.write(b"TAIL" * 1000)


def rewrite_same_size(d: Path) -> None:
    (d / "a.bin").write_bytes(b"R" * (d / "a.bin").stat().st_size)
    os.utime(d / "a.bin", ns=(time.time_ns(), time.time_ns() + 10**10))  # whatever the clock's resolution


# case -> (what the module does to out/data once a.bin's bytes are sent, before /done ends; the file named)
CHANGES = {
    "grow": (grow, "a.bin"),
    "truncate": (lambda d: os.truncate(d / "a.bin", 1000), "a.bin"),
    "rewrite-same-size": (rewrite_same_size, "a.bin"),
    "delete-another": (lambda d: (d / "z.txt").unlink(), "z.txt"),
}


def stored_blob(runtime: Runtime, key: str) -> BlobInfo | None:
    """What the blob store holds under ``key``."""
    return on_own_dataplane(runtime, lambda plane: plane.blobs.info(key))


@pytest.mark.parametrize("plane", KINDS, indirect=True)
def test_done_refuses_outputs_changed_during_the_upload_and_commits_nothing_more(plane: Plane) -> None:
    """The module changed out/data after calling /done (README, The folder contract): 409 naming the
    file as the module sees it, no insight, meta or event stored; the restored outputs commit."""
    event_id = "hostile-changing"
    runtime = plane.runtime(event_id, extra=("--transfer.concurrency=1", "--transfer.tasks=1"))
    out = runtime.layout.basedir / "out"
    d = out / "data"
    store = runtime.dataplane.blobs
    put = store._put
    fault: dict[str, object] = {}

    async def put_then_change(local: Path, key: str):  # the provider's own transfer, then the change
        stored = await put(local, key)
        if local.name == "a.bin" and "change" in fault and "done" not in fault:
            fault["change"](d)
            fault["done"] = key
        return stored

    store._put = put_then_change

    def outputs() -> None:
        reset_outputs(out)
        data(out, "a.bin", os.urandom(300_000))
        data(out, "z.txt", b"z" * 1000)
        event(out, "e1.json", pairs(("eventType", "file_discovered"), ("files", "a.bin,z.txt")))
        (out / "meta.json").write_text(pairs(("k", "v")))

    def stored() -> object:  # insight, event metas and events: what no refused /done may add
        held = plane.committed(event_id)
        return [p for p in held if not p.startswith("blobs")] if plane.stack is None else held[1:]

    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        before = stored()
        for case, (change, named) in CHANGES.items():
            outputs()
            fault.clear()
            fault["change"] = change
            answer = client.get("/done", headers=H)
            body = answer.json()
            ANSWERS[plane.kind][("changing", case)] = (answer.status_code, body.get("message"))
            assert fault.get("done") == blob_key(runtime.cfg, "a.bin"), case  # the change really happened
            assert answer.status_code == 409, (case, body)
            assert body["message"].startswith(f"out/data/{named}: changed after /done was called"), (case, body)
            assert str(plane.root) not in body["message"], (case, body)
            assert stored() == before, case
            if case == "delete-another":  # a.bin's blob had landed before z.txt was found gone
                assert stored_blob(runtime, blob_key(runtime.cfg, "a.bin")) is not None
        # The module restores its outputs: the next /done commits them, blobs matching the files.
        outputs()
        fault.clear()
        good = client.get("/done", headers=H)
        assert good.status_code == 200 and good.json()["files"] == len(files_under(d)), good.text
        for name in ("a.bin", "z.txt"):
            info = stored_blob(runtime, blob_key(runtime.cfg, name))
            assert info is not None and info.size == (d / name).stat().st_size, name
    assert stored() != before
    assert_no_run_left_running(event_id)


@pytest.mark.parametrize("plane", KINDS, indirect=True)
def test_ready_confines_every_path_and_key_of_an_event_meta(plane: Plane) -> None:
    event_id = "hostile-ready"
    runtime = plane.runtime(event_id, "child", parent="someone")
    # In development mode, the key ../../host_secret.txt would name this file, outside the blob folder.
    (plane.root / "host_secret.txt").write_text("the host's, not the module's")
    in_data = runtime.layout.in_data
    record = runtime.layout.basedir / RECORD_DIR
    with TestClient(create_app(runtime)) as client:
        for case in [c for c in READY_CASES if c.id in HTTP_READY]:
            meta = EventMeta(id=event_id, eventId=event_id, correlationId="corr-hostile", parentEventId="someone",
                             eventType="file_discovered", producer="someone",
                             files=[BlobFile(path=p, key=k, size=5) for p, k in case.files],
                             data=[{"key": "k", "value": "v"}])
            on_own_dataplane(runtime, lambda plane: plane.documents.upsert_event_metas([meta]))
            files_before = files_under(plane.root)
            answer = client.get("/ready", headers=H)
            body = answer.json()
            ANSWERS[plane.kind][("ready", case.id)] = (answer.status_code, body.get("message"))
            assert answer.status_code == 502, (case.id, body)
            expected = f"event meta '{event_id}' lists {case.what} '{case.shown}', which "
            assert expected in body["message"] and case.detail in body["message"], (case.id, body["message"])
            # The sidecar's own run record (README, Restarts) is its state, not staged input.
            created = {f for f in files_under(plane.root) - files_before if not (plane.root / f).is_relative_to(record)}
            outside = [f for f in created if not (plane.root / f).is_relative_to(in_data)]
            assert not outside and not created, (case.id, created)
            assert not [p for p in plane.root.rglob("*.partial")], case.id
            # The refused /ready left the record consistent: nothing staged, its flow run reported.
            kept = json.loads((record / RECORD_FILE).read_text())
            assert kept["phase"] == "new" and kept["ready"] is None and kept["published"] == [], (case.id, kept)
            assert kept["unreported"] == {}, (case.id, kept)
    assert not (in_data / "host_secret.txt").exists() and not (runtime.layout.in_meta).exists()
    assert_no_run_left_running(event_id)


@pytest.mark.parametrize("plane", KINDS, indirect=True)
def test_odd_but_good_names_and_values_arrive_unchanged(plane: Plane) -> None:
    parent = plane.runtime("hostile-odd")
    out = parent.layout.basedir / "out"
    contents = {name: f"{i}:{name}".encode() for i, name in enumerate(ODD_NAMES + UNLISTABLE_NAMES)}
    with TestClient(create_app(parent)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        for name, content in contents.items():
            data(out, name, content)
        # Links inside out/data are followed, folders and files alike, under the link's own name.
        data(out, "real/inside.txt", b"through a folder link")
        link(out, "alias", "real")
        link(out, "alias.txt", "real/inside.txt")
        listed = ODD_NAMES + ["alias/inside.txt", "alias.txt"]
        event(out, "1-odd.json", pairs(("eventType", "file_discovered"), ("files", ",".join(listed)),
                                       *ODD_VALUES.items()))
        event(out, "2-bare.json", pairs(("eventType", "file_discovered")))
        (out / "meta.json").write_text(pairs(*ODD_VALUES.items()))
        done = client.get("/done", headers=H)
        assert done.status_code == 200, done.text
    summary = done.json()
    committed = set(contents) | {"real/inside.txt", "alias/inside.txt", "alias.txt"}
    assert summary["files"] == len(committed)
    if plane.stack is not None:  # the container holds exactly these names
        assert set(plane.stack.blobs("hostile-odd/")) == {blob_key(parent.cfg, n) for n in committed}
    odd, bare = summary["events"]

    child = plane.runtime(odd["eventId"], "child", parent="hostile-odd")
    with TestClient(create_app(child)) as client:
        staged = client.get("/ready", headers=H)
        assert staged.status_code == 200, staged.text
    in_data = child.layout.in_data
    assert files_under(in_data) == set(listed)
    for name in ODD_NAMES:
        assert (in_data / name).read_bytes() == contents[name], name
    assert (in_data / "alias" / "inside.txt").read_bytes() == (in_data / "alias.txt").read_bytes() == b"through a folder link"
    assert {p["key"]: p["value"] for p in json.loads(child.layout.in_meta.read_text())} == ODD_VALUES

    # The child of an event with no files and no data: an empty in/data and in/meta.json = [].
    shutil.rmtree(plane.root / "child")
    empty = plane.runtime(bare["eventId"], "child", parent="hostile-odd")
    with TestClient(create_app(empty)) as client:
        assert client.get("/ready", headers=H).json()["files"] == 0
    assert files_under(empty.layout.in_data) == set() and json.loads(empty.layout.in_meta.read_text()) == []
    assert_no_run_left_running("hostile-odd")


def test_development_and_real_providers_answer_alike() -> None:
    """Same status and the same message (file, key and reason) for every case, in both provider sets."""
    dev, real = ANSWERS["dev"], ANSWERS["real"]
    assert dev and set(dev) == set(real), "run the whole module: both provider sets must have answered"
    differ = {case: (dev[case], real[case]) for case in dev if dev[case] != real[case]}
    assert not differ, differ
