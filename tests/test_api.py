"""The HTTP contract and the run's state machine (sidecar/api.py), in process with real flows on the
session's Prefect server and the development providers."""

from __future__ import annotations

import os

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from flows.runtime import Runtime
from sidecar.errors import DataPlaneUnavailable
from testsupport.processes import read_runs
from testsupport.runtime import H, dev_runtime, write_found_outputs
from testsupport.runtime import API_SECRET as SECRET


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    return dev_runtime(tmp_path)


@pytest.fixture
def client(runtime: Runtime):
    from sidecar.api import create_app

    with TestClient(create_app(runtime)) as c:
        yield c


def test_healthz_needs_no_secret_everything_else_does(client: TestClient) -> None:
    first = client.get("/healthz")
    assert first.status_code in (200, 503) and first.json()["phase"] == "new"
    deadline = time.monotonic() + 60
    while client.get("/healthz").status_code != 200:
        assert time.monotonic() < deadline, "the Prefect API never became usable"
        time.sleep(0.05)
    for path in ("/ready", "/done", "/nowhere"):
        for headers in ({}, {"secret": "wrong"}, {"secret": SECRET + "x"}):
            response = client.get(path, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.json() == {"statusCode": 401, "message": "missing or wrong 'secret' header"}


def test_order_is_enforced_and_repeats_return_the_same_summary(client: TestClient, runtime: Runtime) -> None:
    response = client.get("/done", headers=H)
    assert response.status_code == 409 and response.json()["statusCode"] == 409
    assert "/done before /ready" in response.json()["message"]
    first = client.get("/ready", headers=H)
    assert first.status_code == 200 and set(first.json()) == {"flowRunId", "files", "bytes", "seconds"}
    assert client.get("/ready", headers=H).json() == first.json()
    assert json.loads(runtime.layout.in_meta.read_text()) == []
    write_found_outputs(runtime)
    done = client.get("/done", headers=H)
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["files"] == 2 and [e["eventType"] for e in body["events"]] == ["found", "found"]
    assert client.get("/done", headers=H).json() == body
    again = client.get("/ready", headers=H)
    assert again.status_code == 409 and "/ready after /done" in again.json()["message"]


def test_a_repeated_done_names_outputs_written_after_the_commit(client: TestClient, runtime: Runtime, caplog) -> None:
    """A run commits once: a repeat with out/ as committed answers the same summary (a retry after a lost
    answer), one with outputs added, changed or removed since is a 409 naming each, never a 200 that
    drops them. Nothing more is committed either way."""
    lay = runtime.layout
    assert client.get("/ready", headers=H).status_code == 200
    write_found_outputs(runtime)
    (lay.out_data / "sub").mkdir()
    (lay.out_data / "sub" / "kept.txt").write_text("kept")
    lay.out_meta.write_text('[{"key": "k", "value": "v"}]')
    first = client.get("/done", headers=H)
    assert first.status_code == 200, first.text
    events = sorted(p.name for p in (Path(runtime.cfg.devdir) / "events").iterdir())
    caplog.clear()
    with caplog.at_level("INFO", logger="sidecar.api"):
        assert client.get("/done", headers=H).json() == first.json()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert lines == [f"done: already committed by flow run {first.json()['flowRunId']}; nothing new"]

    # A same-size rewrite whose modification time is put back (cp -p, rsync -t, touch -r), in place and
    # by a rename: size and mtime alone let it through with a 200 (hostile trial).
    in_place, renamed = lay.out_data / "f0.txt", lay.out_data / "sub" / "kept.txt"
    for path, content in ((in_place, None), (renamed, "KEPT")):
        before = path.stat()
        if content is None:
            path.write_bytes(b"Z" * before.st_size)
        else:
            (tmp := path.with_name("kept.tmp")).write_text(content)
            os.replace(tmp, path)
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    rewritten = client.get("/done", headers=H)
    assert rewritten.status_code == 409, rewritten.text
    for name in ("out/data/f0.txt: changed", "out/data/sub/kept.txt: changed"):
        assert name in rewritten.json()["message"], (name, rewritten.text)

    (lay.out_data / "late.txt").write_text("late")
    (lay.out_data / "sub" / "kept.txt").write_text("kept, longer")
    (lay.out_data / "f1.txt").unlink()
    lay.out_meta.write_text('[{"key": "k", "value": "changed"}]')
    (lay.out_events / "e9.json").write_text('[{"key": "eventType", "value": "found"}]')
    late = client.get("/done", headers=H)
    assert late.status_code == 409, late.text
    message = late.json()["message"]
    assert "out/data/late.txt: written after /done committed this run's outputs" in message
    assert "start a new run (a new event) to commit it" in message
    for name in ("out/data/sub/kept.txt: changed", "out/data/f1.txt: removed", "out/meta.json: changed",
                 "out/events/e9.json: written after"):
        assert name in message, (name, message)
    assert first.json()["flowRunId"] in message
    assert sorted(p.name for p in (Path(runtime.cfg.devdir) / "events").iterdir()) == events
    assert client.get("/healthz").json()["phase"] == "done"


def test_concurrent_calls_share_one_flow_run(client: TestClient) -> None:
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: client.get("/ready", headers=H), range(4)))
    assert {a.status_code for a in answers} == {200}
    assert len({a.json()["flowRunId"] for a in answers}) == 1


def test_bad_output_is_400_naming_the_file_and_retry_after_fix(client: TestClient, runtime: Runtime) -> None:
    client.get("/ready", headers=H)
    write_found_outputs(runtime)
    (runtime.layout.out_events / "e1.json").write_text('[{"key": "eventType", "value": "lost"}]')
    bad = client.get("/done", headers=H)
    assert bad.status_code == 400
    assert bad.json()["message"].startswith("out/events/e1.json: key 'eventType'")
    assert not (Path(runtime.cfg.devdir) / "events").exists()
    write_found_outputs(runtime)
    assert client.get("/done", headers=H).status_code == 200


class FlakyDocuments:
    """Wraps a DocumentStore; the first ``failures`` event-meta upserts raise DataPlaneUnavailable."""

    def __init__(self, inner, failures: int):
        self.inner, self.failures, self.calls = inner, failures, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def upsert_event_metas(self, metas):
        self.calls += 1
        if self.calls <= self.failures:
            raise DataPlaneUnavailable("document store", "connection refused (injected)")
        await self.inner.upsert_event_metas(metas)


class CountingEvents:
    def __init__(self, inner):
        self.inner, self.published = inner, []

    def __getattr__(self, name):  # the rest of the EventPublisher interface
        return getattr(self.inner, name)

    async def publish(self, events, **options):
        self.published += [e.id for e in events]
        await self.inner.publish(events, **options)

    async def close(self):
        await self.inner.close()


def test_failed_done_is_503_publishes_nothing_and_retry_publishes_once(tmp_path: Path) -> None:
    from sidecar.api import create_app

    runtime = dev_runtime(tmp_path)
    runtime.dataplane.documents = FlakyDocuments(runtime.dataplane.documents, failures=1)
    runtime.dataplane.events = events = CountingEvents(runtime.dataplane.events)
    with TestClient(create_app(runtime)) as client:
        client.get("/ready", headers=H)
        write_found_outputs(runtime, 3)
        failed = client.get("/done", headers=H)
        assert failed.status_code == 503 and "document store" in failed.json()["message"]
        assert events.published == []
        ok = client.get("/done", headers=H)
        assert ok.status_code == 200
        assert sorted(events.published) == sorted(e["eventId"] for e in ok.json()["events"])
        assert len(events.published) == 3
        assert client.get("/done", headers=H).json() == ok.json() and len(events.published) == 3


def test_task_retries_recover_a_transient_failure(tmp_path: Path) -> None:
    from sidecar.api import create_app

    runtime = dev_runtime(tmp_path, "--transfer.retries=2", "--transfer.retrydelayseconds=0.05")
    runtime.dataplane.documents = flaky = FlakyDocuments(runtime.dataplane.documents, failures=2)
    with TestClient(create_app(runtime)) as client:
        client.get("/ready", headers=H)
        write_found_outputs(runtime, 1)
        assert client.get("/done", headers=H).status_code == 200
    assert flaky.calls == 3


def test_flow_and_task_runs_are_recorded_in_the_prefect_api(client: TestClient, runtime: Runtime) -> None:
    """What the Prefect UI shows: the done flow run, named for module and event, and its task runs."""
    client.get("/ready", headers=H)
    write_found_outputs(runtime, 2)
    (runtime.layout.out_meta).write_text(json.dumps([{"key": "score", "value": "1"}]))
    run_id = client.get("/done", headers=H).json()["flowRunId"]

    expected = ["publish-2-events", "upload-2-files", "upsert-2-event-metas", "upsert-insight"]
    # A task run the API's recorder has not given a state yet reads as state None: not settled, read again.
    [flow_run], tasks = read_runs([run_id], lambda runs: sorted(t.name for t in runs) == expected
                                  and all(t.state is not None and t.state.is_completed() for t in runs))
    assert flow_run.name == "done-mod-evt-api" and flow_run.state.is_completed()
    assert sorted(t.name for t in tasks) == expected
    assert all(t.state.is_completed() for t in tasks)


def test_ready_clears_what_another_run_left_so_done_commits_only_this_run(client: TestClient, runtime: Runtime) -> None:
    lay = runtime.layout
    lay.prepare()
    (lay.out_data / "stale.txt").write_text("from an earlier run")
    (lay.out_events / "stale.json").write_text(json.dumps([{"key": "eventType", "value": "found"}]))
    (lay.in_data / "old-input.bin").write_bytes(b"x")
    assert client.get("/ready", headers=H).status_code == 200
    assert list(lay.out_data.iterdir()) == [] and list(lay.out_events.iterdir()) == [] and list(lay.in_data.iterdir()) == []
    write_found_outputs(runtime, 1)
    done = client.get("/done", headers=H).json()
    assert done["files"] == 1 and len(done["events"]) == 1


@pytest.mark.parametrize("event_id", ["events", "blobs", "documents", "prefect"])
def test_an_event_id_named_like_a_dev_folder_keeps_its_dumps_apart(tmp_path: Path, event_id: str) -> None:
    # Debug dumps once went to {devdir}/{eventid}: event id "events" put insight.json and folders among
    # the published events, "prefect" into the development Prefect server's state (hostile trial).
    from sidecar.api import create_app

    runtime = dev_runtime(tmp_path, f"--context.eventid={event_id}")
    with TestClient(create_app(runtime)) as client:
        assert client.get("/ready", headers=H).status_code == 200
        write_found_outputs(runtime)
        (runtime.layout.out_meta).write_text('[{"key": "k", "value": "v"}]')
        done = client.get("/done", headers=H)
        assert done.status_code == 200, done.text
    dev = tmp_path / ".dev"
    published = sorted(p.name for p in (dev / "events").iterdir())
    assert published == sorted(f"{e['eventId']}.json" for e in done.json()["events"]) and published
    dumps = dev / "dumps" / event_id / "mod"
    assert (dumps / "dev.done").is_file() and (dumps / "insight.json").is_file()
    assert not (dev / event_id / "dev.done").exists()


def test_debug_dumps_of_modules_sharing_an_event_are_kept_apart(tmp_path: Path) -> None:
    # An event fans out to every module subscribed to its type: each sidecar runs with the same event id
    # and its own module name. The dumps used to share {devdir}/dumps/{eventid}/ and overwrite each other.
    from sidecar.api import create_app

    dumps = tmp_path / ".dev" / "dumps" / "evt-api"
    for name, n in (("thumbnails", 1), ("ocr", 2)):
        runtime = dev_runtime(tmp_path, f"--context.name={name}", f"--basedir={tmp_path / 'ion' / str(n)}")
        with TestClient(create_app(runtime)) as c:
            assert c.get("/ready", headers=H).status_code == 200
            write_found_outputs(runtime, n)
            assert c.get("/done", headers=H).status_code == 200
    assert sorted(p.name for p in dumps.iterdir()) == ["ocr", "thumbnails"]
    for name, n in (("thumbnails", 1), ("ocr", 2)):
        done = json.loads((dumps / name / "dev.done").read_text())
        assert done["summary"]["files"] == n and len(list((dumps / name / "events").iterdir())) == n
